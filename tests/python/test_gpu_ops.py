"""The CUDA kernels against the CPU reference ops and a float64 torch reference.

Every test carries the `gpu` marker and skips without a GPU and a CUDA build (conftest.py).
LoRA rows come from lora_fixtures (shuffled, gapped, 16-byte aligned rows in a uint8 arena; row
table entries past a slot's rank point at a NaN row), copied to the GPU with their row tables.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from lora_fixtures import POPULARITIES, assign_slots, make_lora_site, route_experts
from moelora import _C, ops
from test_ops_paged_attention import reference as attention_reference

pytestmark = pytest.mark.gpu

# (rtol, atol) against the float64 reference rounded to the output dtype.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}
# GPU against the CPU op: both round once from fp32 sums taken in different orders.
CPU_TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}
SLOT_RANKS = [4, 8, 0, 16, 64, 8, 32, 13]  # mixed ranks 4..64, one slot that targets nothing
INTER_OF = {4104: 4112, 2880: 768, 888: 444, 111: 74}
CUDA = torch.device("cuda")


def plan_for(pairs, dtype=torch.bfloat16, num_experts=1, num_adapters=None, **overrides):
    """The plan of a GPU call of `pairs` pairs with `overrides` forced (PlanOverrides keywords;
    "auto" or none: the rule's choice)."""
    return ops.plan_lora(pairs, num_experts=num_experts, num_adapters=num_adapters, dtype=dtype,
                         device=CUDA, overrides=ops.PlanOverrides(**overrides))


def gpu_view(site):
    """The same site with its arena, row table and ranks on the GPU."""
    arena, table, ranks = site.view._keepalive
    v = site.view
    dtype = site.a_dtype
    return ops.make_site_view(
        arena.to(CUDA), table.to(CUDA), ranks.to(CUDA), num_experts=v.num_experts,
        max_rank=v.max_rank, in_dim=v.in_dim, out_dim=v.out_dim, dtype=dtype,
    )


def make_site(ranks, experts, in_dim, out_dim, dtype, seed):
    made = make_lora_site(ranks, experts, in_dim, out_dim, dtype, seed)
    made.a_dtype = dtype
    return made


def rows(n, cols, dtype, gen, pad, fill=None):
    """A [n, cols] view with row stride cols + pad; the pad columns hold NaN."""
    full = torch.full((n, cols + pad), float("nan"), dtype=torch.float64)
    full[:, :cols] = torch.randn(n, cols, generator=gen, dtype=torch.float64) if fill is None else fill
    return full.to(dtype)[:, :cols]


def reference_delta(x64, token_slot, topk_ids, weights, sites, col_offsets, width, pairs_per_row):
    """float64 [P, width] deltas and the mask of elements the op must write, grouped per
    (slot, expert) so the reference stays fast at hidden 2880."""
    top_k = topk_ids.shape[1]
    num_pairs = token_slot.numel() * top_k
    delta = torch.zeros(num_pairs, width, dtype=torch.float64)
    written = torch.zeros(num_pairs, width, dtype=torch.bool)
    pair_slot = token_slot.long().repeat_interleave(top_k)
    pair_expert = topk_ids.reshape(-1).long()
    w = torch.ones(num_pairs, dtype=torch.float64) if weights is None else weights.double()
    for slot, expert in set(zip(pair_slot.tolist(), pair_expert.tolist())):
        if slot < 0:
            continue
        pairs = ((pair_slot == slot) & (pair_expert == expert)).nonzero().flatten()
        xin = x64[pairs // pairs_per_row]
        for site, col in zip(sites, col_offsets):
            if site.ranks[slot] == 0:
                continue
            d = (xin @ site.a[slot][expert].T) @ site.b[slot][expert].T
            delta[pairs, col : col + site.out_dim] = w[pairs, None] * d
            written[pairs, col : col + site.out_dim] = True
    return delta, written


def make_problem(tokens, hidden, top_k, experts, popularity, dtype, stage, aligned, seed):
    gen = torch.Generator().manual_seed(seed)
    inter = INTER_OF[hidden]
    token_slot = assign_slots(tokens, SLOT_RANKS, popularity, seed)
    topk_ids = route_experts(tokens, top_k, experts, seed + 1)
    num_pairs = tokens * top_k
    pad = 8 if aligned else 5
    if stage == "w13":
        sites = [
            make_site(SLOT_RANKS, experts, hidden, inter, dtype, seed + 2),
            make_site(SLOT_RANKS[::-1], experts, hidden, inter, dtype, seed + 3),
        ]
        gap = 0 if aligned else 3  # unaligned: a 3-column gap that must stay untouched
        col_offsets, width, pairs_per_row = [0, inter + gap], 2 * inter + gap, top_k
        x = rows(tokens, hidden, dtype, gen, pad)
    else:
        sites = [make_site(SLOT_RANKS, experts, inter, hidden, dtype, seed + 2)]
        col_offsets, width, pairs_per_row = [0], hidden, 1
        x = rows(num_pairs, inter, dtype, gen, pad)
    weights = torch.rand(num_pairs, generator=gen) if stage == "w2" else None
    delta, written = reference_delta(
        x.double(), token_slot, topk_ids, weights, sites, col_offsets, width, pairs_per_row
    )
    base64 = torch.randn(num_pairs, width, generator=gen, dtype=torch.float64)
    base64[~written] = float("nan")  # poison: whatever the op must not write
    output = rows(num_pairs, width, dtype, gen, pad, fill=base64)
    expected = (output.double() + delta).to(dtype)
    return {
        "token_slot": token_slot, "topk_ids": topk_ids, "sites": sites,
        "col_offsets": col_offsets, "pairs_per_row": pairs_per_row, "x": x, "weights": weights,
        "output": output, "expected": expected, "written": written, "experts": experts,
    }


def copy_strided(t, device):
    """A copy of a strided 2-D view on `device` with the same strides (padding included)."""
    stride = t.stride(0)
    return t.as_strided((t.shape[0], stride), (stride, 1)).to(device, copy=True)[:, : t.shape[1]]


def run_fused(prob, device, block_m, views=None, num_adapters=None, overrides=None):
    """align + fused_moe_lora on `device`; on the GPU with the plan `overrides` (a dict of
    PlanOverrides keywords) force, or none (each op plans its own call)."""
    dev = torch.device(device)
    token_slot = prob["token_slot"].to(dev)
    topk_ids = prob["topk_ids"].to(dev)
    x = copy_strided(prob["x"], dev)
    out = copy_strided(prob["output"], dev)
    weights = None if prob["weights"] is None else prob["weights"].to(dev)
    if views is None:
        views = [gpu_view(s) if dev.type == "cuda" else s.view for s in prob["sites"]]
    plan = None
    if overrides is not None and dev.type == "cuda":
        plan = plan_for(topk_ids.numel(), x.dtype, prob["experts"], num_adapters, **overrides)
    meta = ops.moe_lora_align(topk_ids, token_slot, prob["experts"], len(SLOT_RANKS), block_m,
                              plan=plan)
    ops.fused_moe_lora(
        x, out, *meta, block_m, views, prob["col_offsets"],
        input_pairs_per_row=prob["pairs_per_row"], topk_weights=weights, num_adapters=num_adapters,
        plan=plan,
    )
    return out, meta


def _fused_cases():
    """tokens x hidden x popularity, with dtype, stage, layout, top_k, experts, block_m rotating."""
    cases = []
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    for i, (tokens, hidden, popularity) in enumerate(
        itertools.product([1, 7, 133], [2880, 888, 111], POPULARITIES)
    ):
        dtype = dtypes[i % 3]
        top_k, experts = [(4, 32), (2, 8), (1, 1), (8, 13)][i % 4]
        block_m = [16, 1, 4, 64][(i // 2) % 4]
        aligned = i % 2 == 0
        cases.append((tokens, hidden, popularity, dtype, top_k, experts, block_m, aligned))
    return cases


@pytest.mark.parametrize("stage", ["w13", "w2"])
@pytest.mark.parametrize(
    "tokens,hidden,popularity,dtype,top_k,experts,block_m,aligned", _fused_cases()
)
def test_gpu_fused_moe_lora_matches_cpu_and_float64(
    tokens, hidden, popularity, dtype, top_k, experts, block_m, aligned, stage
):
    seed = tokens * 1000 + hidden + top_k * 7 + experts + block_m + (stage == "w2")
    prob = make_problem(tokens, hidden, top_k, experts, popularity, dtype, stage, aligned, seed)
    out_gpu, _ = run_fused(prob, "cuda", block_m)
    out_cpu, _ = run_fused(prob, "cpu", block_m)
    check_fused_result(out_gpu, out_cpu, prob, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 133])
def test_gpu_fused_moe_lora_repeated_runs_are_identical(dtype, tokens):
    prob = make_problem(tokens, 2880, 4, 32, "zipf", dtype, "w2", True, seed=5)
    views = [gpu_view(s) for s in prob["sites"]]
    first, _ = run_fused(prob, "cuda", 16, views)
    for _ in range(3):
        again, _ = run_fused(prob, "cuda", 16, views)
        assert torch.equal(first.nan_to_num(7.0), again.nan_to_num(7.0))


@pytest.mark.parametrize("tokens,top_k,experts,block_m", [(1, 4, 32, 16), (7, 2, 8, 4), (133, 8, 13, 16), (513, 4, 128, 64), (2100, 4, 32, 64), (8191, 8, 128, 16)])
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("kernel", ["single", "multi", "auto"])
def test_gpu_align_matches_cpu_per_group(kernel, tokens, top_k, experts, block_m, popularity):
    # multi: align/multi_cta.cu, one cooperative launch (chunks of >= 512 pairs, at most one
    # per SM: 2052 pairs span 5, 8400 span 17, 65528 span one per SM, more than a warp's 32);
    # auto: the one-CTA form below 4096 pairs, the multi-CTA form from there
    plan = plan_for(tokens * top_k, align_kernel=kernel)
    seed = tokens + top_k + experts
    token_slot = assign_slots(tokens, SLOT_RANKS, popularity, seed)
    topk_ids = route_experts(tokens, top_k, experts, seed + 1)
    cpu = ops.moe_lora_align(topk_ids, token_slot, experts, len(SLOT_RANKS), block_m)
    gpu = [t.cpu() for t in ops.moe_lora_align(topk_ids.to(CUDA), token_slot.to(CUDA), experts,
                                               len(SLOT_RANKS), block_m, plan=plan)]
    assert torch.equal(cpu[3], gpu[3]), "num_blocks"
    assert torch.equal(cpu[1], gpu[1]), "block_slot"
    assert torch.equal(cpu[2], gpu[2]), "block_expert"
    sp_cpu = cpu[0].view(-1, block_m)
    sp_gpu = gpu[0].view(-1, block_m)
    # Same set of pairs per (slot, expert) group; padding (-1) at the same places.
    groups = {}
    for b in range(int(cpu[3])):
        key = (int(cpu[1][b]), int(cpu[2][b]))
        groups.setdefault(key, [[], []])
        groups[key][0] += sp_cpu[b].tolist()
        groups[key][1] += sp_gpu[b].tolist()
    for key, (c, g) in groups.items():
        assert sorted(c) == sorted(g), f"group {key}"
        assert [p < 0 for p in c] == [p < 0 for p in g], f"padding of group {key}"
    assert (sp_gpu[int(cpu[3]) :] == -1).all()


@pytest.mark.parametrize("kernel", ["single", "multi"])
def test_gpu_align_dense_rows_and_all_base(kernel):
    plan = plan_for(7, align_kernel=kernel)
    token_slot = torch.tensor([2, -1, 0, 2, 2, 5, -1], dtype=torch.int32)
    cpu = ops.moe_lora_align(None, token_slot, 1, 6, 2)
    gpu = [t.cpu() for t in ops.moe_lora_align(None, token_slot.to(CUDA), 1, 6, 2, plan=plan)]
    for c, g in zip(cpu[1:], gpu[1:]):
        assert torch.equal(c, g)
    base = torch.full((9,), -1, dtype=torch.int32, device=CUDA)
    out = ops.moe_lora_align(torch.zeros(9, 2, dtype=torch.int32, device=CUDA), base, 4, 3, 8,
                             plan=plan_for(18, align_kernel=kernel))
    assert int(out[3].item()) == 0 and (out[0] == -1).all() and (out[1] == -1).all()


@pytest.mark.parametrize("kernel", ["single", "multi"])
def test_gpu_align_replays_from_a_cuda_graph(kernel):
    # The multi-CTA form is a cooperative kernel node in a graph; replays with new routing give
    # what eager calls give (the per-group pair sets; order within a group may differ).
    tokens, top_k, experts, block_m = 4096, 8, 64, 32
    plan = plan_for(tokens * top_k, align_kernel=kernel)
    topk_ids = torch.zeros(tokens, top_k, dtype=torch.int32, device=CUDA)
    token_slot = torch.zeros(tokens, dtype=torch.int32, device=CUDA)
    ops.moe_lora_align(topk_ids, token_slot, experts, len(SLOT_RANKS), block_m,
                       plan=plan)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.moe_lora_align(topk_ids, token_slot, experts, len(SLOT_RANKS), block_m,
                                      plan=plan)
    for seed in (3, 4):
        topk_ids.copy_(route_experts(tokens, top_k, experts, seed))
        token_slot.copy_(assign_slots(tokens, SLOT_RANKS, "zipf", seed))
        for t in captured:
            t.fill_(-7)  # poison: the replay must write every output
        graph.replay()
        eager = ops.moe_lora_align(topk_ids, token_slot, experts, len(SLOT_RANKS), block_m,
                                   plan=plan)
        assert int(captured[3]) == int(eager[3])
        assert torch.equal(captured[1], eager[1]) and torch.equal(captured[2], eager[2])
        # Per (slot, expert) group, the same multiset of rows (pairs and padding).
        group = (eager[1].long() * experts + eager[2].long()).repeat_interleave(block_m)
        keys_g = (group * 2**32 + captured[0].long()).sort().values
        keys_e = (group * 2**32 + eager[0].long()).sort().values
        assert torch.equal(keys_g, keys_e)


@pytest.mark.parametrize("kernel,tokens,experts,num_slots", [
    ("multi", 2100, 32, 8),      # the cooperative form's counters: (chunks + 1) x groups
    ("single", 300, 1024, 48),   # 49152 groups, past shared memory: global counters
    ("auto", 7, 8, 8),           # the one-CTA form in shared memory: no workspace at all
])
def test_gpu_align_takes_its_counters_from_the_callers_workspace(kernel, tokens, experts,
                                                                  num_slots):
    # ops.moe_lora_align passes a workspace sized by moe_lora_align_workspace_bytes (no
    # stream-ordered allocation, so no memory nodes in a captured graph); the result must match
    # the CPU op.
    top_k = 4
    plan = plan_for(tokens * top_k, align_kernel=kernel)
    topk_ids = route_experts(tokens, top_k, experts, 5)
    token_slot = assign_slots(tokens, [8] * num_slots, "uniform", 6)
    nbytes = _C.moe_lora_align_workspace_bytes(tokens * top_k, experts, num_slots, True, plan)
    assert (nbytes > 0) == (kernel != "auto")
    cpu = ops.moe_lora_align(topk_ids, token_slot, experts, num_slots, 16)
    gpu = [t.cpu() for t in ops.moe_lora_align(topk_ids.to(CUDA), token_slot.to(CUDA), experts,
                                               num_slots, 16, plan=plan)]
    for c, g in zip(cpu[1:], gpu[1:]):
        assert torch.equal(c, g)
    group = (cpu[1].long() * experts + cpu[2].long()).repeat_interleave(16)
    assert torch.equal((group * 2**32 + cpu[0].long()).sort().values,
                       (group * 2**32 + gpu[0].long()).sort().values)


_SHORT_WORKSPACE_CALL = """
import torch
from moelora import _C, ops
from moelora._tensor import as_ref, stream_handle
from lora_fixtures import assign_slots, route_experts
cuda = torch.device("cuda")
plan = ops.plan_lora(2100 * 4, device=cuda, overrides=ops.PlanOverrides(align_kernel="multi"))
ids = route_experts(2100, 4, 32, 5).to(cuda)
slots = assign_slots(2100, [8] * 8, "uniform", 6).to(cuda)
outs = ops.moe_lora_align(ids, slots, 32, 8, 16, plan=plan)
nbytes = _C.moe_lora_align_workspace_bytes(2100 * 4, 32, 8, True, plan)
short = torch.empty(nbytes - 1, dtype=torch.uint8, device=cuda)
print("needed", nbytes, flush=True)
try:
    _C.moe_lora_align(*(as_ref(t) for t in (ids, slots)), 32, 8, 16,
                      *(as_ref(t) for t in outs), stream_handle(cuda), as_ref(short), plan)
except RuntimeError as error:
    print(type(error).__name__, error, flush=True)
"""


def test_gpu_align_refuses_an_undersized_workspace_by_name():
    # In a subprocess: on the GPU machine this refusal once killed the process (its g++ links
    # libstdc++ statically, and the message's numbers went through an iostream; see
    # test_static_cxx_runtime.py), so a regression fails this test alone.
    import os
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _SHORT_WORKSPACE_CALL],
                          check=False,
                          cwd=os.path.dirname(__file__), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-3000:]
    needed = int(done.stdout.split()[1])
    assert (f"InvalidArgument moe_lora_align: workspace must hold moe_lora_align_workspace_bytes"
            f" = {needed} bytes, got uint8[{needed - 1}] strides [1] on cuda:0") in done.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [2880, 111])
def test_gpu_dense_lora_matches_cpu(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    tokens = 133
    token_slot = assign_slots(tokens, SLOT_RANKS, "uniform", hidden)
    q = make_site(SLOT_RANKS, 1, hidden, hidden, dtype, 3)
    v = make_site(SLOT_RANKS[::-1], 1, hidden, 64, dtype, 4)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    out = torch.randn(tokens, hidden + 64, generator=gen).to(dtype)
    results = []
    for dev in ("cpu", "cuda"):
        views = [q.view, v.view] if dev == "cpu" else [gpu_view(q), gpu_view(v)]
        o = out.clone().to(dev)
        sorted_rows, block_slot, _, num_blocks = ops.moe_lora_align(
            None, token_slot.to(dev), 1, len(SLOT_RANKS), 8
        )
        ops.dense_lora(x.to(dev), o, sorted_rows, block_slot, num_blocks, 8, views, [0, hidden])
        results.append(o.cpu())
    rtol, atol = CPU_TOLERANCE[dtype]
    torch.testing.assert_close(results[1].double(), results[0].double(), rtol=rtol, atol=atol)


def replay_align_and_fused(prob, experts, block_m, top_k, overrides=None):
    """(graph replay output, eager output, starting output) of align + fused_moe_lora (w13)
    captured in a CUDA graph, under a plan with `overrides` (PlanOverrides keywords) or none."""
    views = [gpu_view(s) for s in prob["sites"]]
    token_slot = prob["token_slot"].to(CUDA)
    topk_ids = prob["topk_ids"].to(CUDA)
    x = prob["x"].to(CUDA)
    out0 = prob["output"].nan_to_num(0.0).to(CUDA)
    plan = None if overrides is None else plan_for(topk_ids.numel(), x.dtype, experts,
                                                   **overrides)

    def delta(out):
        meta = ops.moe_lora_align(topk_ids, token_slot, experts, len(SLOT_RANKS), block_m,
                                  plan=plan)
        ops.fused_moe_lora(x, out, *meta, block_m, views, prob["col_offsets"],
                           input_pairs_per_row=top_k, plan=plan)

    eager = out0.clone()
    delta(eager)
    out = out0.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        delta(out)
    out.copy_(out0)
    graph.replay()
    torch.cuda.synchronize()
    return out, eager, out0


def test_gpu_align_and_fused_capture_in_a_cuda_graph():
    prob = make_problem(7, 2880, 4, 32, "uniform", torch.bfloat16, "w13", True, seed=9)
    out, eager, _ = replay_align_and_fused(prob, experts=32, block_m=16, top_k=4)
    assert torch.equal(out, eager)


# ---- paged KV cache and attention ----------------------------------------------------------------

BLOCK_TOKENS = 16
# Split-KV by the plan's rule, and forced to 3 (a cluster split on short contexts too).
SPLITS, SPLIT_IDS = [None, 3], ["split-auto", "split3"]
ATTN_TOLERANCE = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "gqa,head_dim,window,use_sinks",
    [(1, 64, 0, False), (8, 64, 0, True), (4, 128, 100, False), (1, 36, 7, True),
     (16, 128, 0, True), (5, 64, 33, False)],
)
@pytest.mark.parametrize("kernel", ["per_head", "gqa", "mma"])
@pytest.mark.parametrize("splits", SPLITS, ids=SPLIT_IDS)
def test_gpu_kv_cache_and_paged_attention(splits, kernel, dtype, gqa, head_dim, window,
                                          use_sinks):
    # decode tokens and chunked-prefill chunks (several trailing positions of one sequence);
    # kernel gqa / mma: attention/gqa.cu / attention/mma.cu where the layout
    # qualifies, else the next kernel of the chain (head_dim 36: per-head; 16 query heads per
    # KV head: mma only); split-KV by the plan's rule, or forced to 3
    check_paged_attention(dtype, gqa, head_dim, window, use_sinks, [1, 37, 16, 300, 1100],
                          [1, 9, 1, 20, 3], attention_kernel=kernel, attention_splits=splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,use_sinks", [(0, False), (0, True), (3000, True)])
@pytest.mark.parametrize("kernel,gqa", [("per_head", 1), ("gqa", 1), ("gqa", 4), ("mma", 1),
                                        ("mma", 8)])
@pytest.mark.parametrize("splits", SPLITS, ids=SPLIT_IDS)
def test_gpu_paged_attention_splits_long_contexts(splits, kernel, gqa, dtype, window, use_sinks):
    # few (token, head) pairs over long contexts: the kernel splits the keys over a cluster
    # (split-KV); repeated runs must stay bit-identical (fixed merge order)
    forced = {"attention_kernel": kernel, "attention_splits": splits}
    first = check_paged_attention(dtype, gqa, 128, window, use_sinks, [6000, 2500, 7], [1, 2, 1],
                                  **forced)
    again = check_paged_attention(dtype, gqa, 128, window, use_sinks, [6000, 2500, 7], [1, 2, 1],
                                  **forced)
    assert torch.equal(first, again)


@pytest.mark.parametrize("kernel", ["per_head", "gqa", "mma"])
@pytest.mark.parametrize("splits", SPLITS, ids=SPLIT_IDS)
def test_gpu_paged_attention_odd_page_size(splits, kernel):
    # 7 tokens a page: tiles and split ranges straddle pages at every offset
    check_paged_attention(torch.bfloat16, 4, 128, 0, True, [1, 37, 700], [1, 3, 2],
                          block_tokens=7, attention_kernel=kernel, attention_splits=splits)


def check_paged_attention(dtype, gqa, head_dim, window, use_sinks, seq_lens, chunks,
                          block_tokens=BLOCK_TOKENS, **overrides):
    """kv_cache_write + paged_attention on the GPU (with the plan `overrides` force: keywords of
    PlanOverrides) against the CPU op and the float64 reference; the last `chunks[s]` positions
    of sequence s are queried. Returns the output."""
    gen = torch.Generator().manual_seed(head_dim + gqa + window)
    num_kv_heads = 2
    num_heads = num_kv_heads * gqa
    max_blocks = max(-(-n // block_tokens) for n in seq_lens) + 1
    num_pages = sum(-(-n // block_tokens) for n in seq_lens) + 5
    page_bytes = ops.kv_page_bytes_needed(block_tokens, num_kv_heads, head_dim, dtype) + 256
    pages = torch.randperm(num_pages, generator=gen).tolist()
    block_table = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    keys, values, slots = [], [], []
    for s, n in enumerate(seq_lens):
        for b in range(-(-n // block_tokens)):
            block_table[s, b] = pages.pop()
        keys.append(torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype))
        values.append(torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype))
        slots += [int(block_table[s, j // block_tokens]) * block_tokens + j % block_tokens for j in range(n)]
    order = torch.randperm(len(slots), generator=gen)
    k_in = torch.cat([torch.cat(keys)[order], torch.zeros(1, num_kv_heads, head_dim, dtype=dtype)])
    v_in = torch.cat([torch.cat(values)[order], torch.zeros(1, num_kv_heads, head_dim, dtype=dtype)])
    slot_mapping = torch.cat([torch.tensor(slots, dtype=torch.int64)[order], torch.tensor([-1])])
    k_strided = torch.cat([k_in, k_in], dim=2)[:, :, :head_dim]

    arenas = {}
    for dev in ("cpu", "cuda"):
        arena = torch.full((num_pages * page_bytes,), 0xFF, dtype=torch.uint8, device=dev)
        cache = ops.make_kv_cache_view(
            arena, page_bytes=page_bytes, block_tokens=block_tokens, num_kv_heads=num_kv_heads,
            head_dim=head_dim, dtype=dtype,
        )
        ops.kv_cache_write(k_strided.to(dev), v_in.to(dev), slot_mapping.to(dev), cache)
        arenas[dev] = (arena, cache)
    assert torch.equal(arenas["cuda"][0].cpu(), arenas["cpu"][0]), "kv_cache_write bytes differ"

    query_seq, query_pos = [], []
    for s, n in enumerate(seq_lens):
        for pos in range(n - chunks[s], n):
            query_seq.append(s)
            query_pos.append(pos)
    query_seq = torch.tensor(query_seq, dtype=torch.int32)
    query_pos = torch.tensor(query_pos, dtype=torch.int32)
    num_tokens = query_seq.numel()
    q_full = torch.randn(num_tokens, num_heads, head_dim + 4, generator=gen).to(dtype)
    sinks = torch.randn(num_heads, generator=gen) if use_sinks else None
    scale = 1.0 / math.sqrt(head_dim)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    outs = {}
    plan = ops.plan_attention(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              page_bytes=page_bytes, max_context=max_blocks * block_tokens,
                              dtype=dtype, device=CUDA, overrides=ops.PlanOverrides(**overrides))
    for dev in ("cpu", "cuda"):
        query = q_full.to(dev)[:, :, :head_dim]
        out_full = torch.full((num_tokens, num_heads, head_dim + 3), float("nan"), dtype=dtype, device=dev)
        ops.paged_attention(
            query, query_seq.to(dev), query_pos.to(dev), block_table.to(dev), lens.to(dev),
            arenas[dev][1], scale, sliding_window=window,
            sinks=None if sinks is None else sinks.to(dev), out=out_full[:, :, :head_dim],
            plan=plan if dev == "cuda" else None,
        )
        outs[dev] = out_full.cpu()
    got = outs["cuda"][:, :, :head_dim]
    assert torch.isnan(outs["cuda"][:, :, head_dim:]).all()
    expected = attention_reference(
        q_full[:, :, :head_dim].double(), keys, values, query_seq, query_pos, seq_lens, scale,
        window, sinks,
    )
    rtol, atol = ATTN_TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), expected.to(dtype).double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(got.double(), outs["cpu"][:, :, :head_dim].double(), rtol=rtol, atol=atol)
    return got


# ---- tensor-core (mma) path: prefill-shaped groups ------------------------------------------------
# The plan takes the mma kernel for 16-bit dtypes with 16-byte aligned rows from 512 pairs; these
# tests force it (few adapters and few experts, so that each (slot, expert) group holds many
# rows). Dims are multiples of 8 (vectorised) but not of 64 (the kernels' K chunk and column
# tile): 888 = 13 * 64 + 56, 232 = 3 * 64 + 40.

MMA_MIN_ROWS_PER_BLOCK = 8
SMALL_RANKS = [4, 8, 0, 16, 1, 8, 12, 13]  # max 16: w13 fits a 32-column pass
MID_RANKS = [4, 8, 0, 16, 32, 8, 24, 13]  # max 32: w13 fits a 64-column pass
RANK_SETS = {"slot": SLOT_RANKS, "small": SMALL_RANKS, "mid": MID_RANKS}


def few_adapter_slots(tokens, slots, seed, base_fraction=0.2):
    """int32 [tokens]: each token on one of `slots` (1-3 adapters), some on the base model (-1)."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.tensor(slots)[torch.randint(0, len(slots), (tokens,), generator=gen)]
    base = torch.rand(tokens, generator=gen) < base_fraction
    base[0] = False
    return torch.where(base, torch.full_like(pick, -1), pick).to(torch.int32)


def make_prefill_problem(tokens, hidden, inter, top_k, experts, slots, ranks, dtype, stage, seed):
    """Like make_problem, with explicit dims, adapters and ranks; rows padded by 8 (aligned) and,
    for w13, 8 poisoned columns between the gate and up slices."""
    gen = torch.Generator().manual_seed(seed)
    token_slot = few_adapter_slots(tokens, slots, seed)
    topk_ids = route_experts(tokens, top_k, experts, seed + 1)
    num_pairs = tokens * top_k
    if stage == "w13":
        sites = [
            make_site(ranks, experts, hidden, inter, dtype, seed + 2),
            make_site(ranks[::-1], experts, hidden, inter, dtype, seed + 3),
        ]
        col_offsets, width, pairs_per_row = [0, inter + 8], 2 * inter + 8, top_k
        x = rows(tokens, hidden, dtype, gen, 8)
    else:
        sites = [make_site(ranks, experts, inter, hidden, dtype, seed + 2)]
        col_offsets, width, pairs_per_row = [0], hidden, 1
        x = rows(num_pairs, inter, dtype, gen, 8)
    weights = torch.rand(num_pairs, generator=gen) if stage == "w2" else None
    delta, written = reference_delta(
        x.double(), token_slot, topk_ids, weights, sites, col_offsets, width, pairs_per_row
    )
    base64 = torch.randn(num_pairs, width, generator=gen, dtype=torch.float64)
    base64[~written] = float("nan")
    output = rows(num_pairs, width, dtype, gen, 8, fill=base64)
    expected = (output.double() + delta).to(dtype)
    return {
        "token_slot": token_slot, "topk_ids": topk_ids, "sites": sites,
        "col_offsets": col_offsets, "pairs_per_row": pairs_per_row, "x": x, "weights": weights,
        "output": output, "expected": expected, "written": written, "experts": experts,
    }


def check_fused_result(out_gpu, out_cpu, prob, dtype):
    """GPU output against float64 and (unless None) the CPU op; elements the op does not own
    and the row padding of the strided output stay poisoned."""
    got = out_gpu.cpu()
    written = prob["written"]
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(
        got[written].double(), prob["expected"][written].double(), rtol=rtol, atol=atol
    )
    if out_cpu is not None:
        rtol, atol = CPU_TOLERANCE[dtype]
        torch.testing.assert_close(got[written].double(), out_cpu[written].double(), rtol=rtol,
                                   atol=atol)
    assert torch.isnan(got[~written]).all(), "the kernel wrote outside the pairs/columns it owns"
    stride = out_gpu.stride(0)
    full = out_gpu.as_strided((out_gpu.shape[0], stride), (stride, 1)).cpu()
    assert torch.isnan(full[:, out_gpu.shape[1] :]).all()


# tokens, hidden, inter, top_k, experts, slots (adapters in use), rank set, dtype, block_m
_MMA_CASES = [
    (133, 888, 232, 2, 2, [4], "slot", torch.bfloat16, 64),  # one adapter of rank 64
    (133, 2880, 768, 1, 1, [0, 7], "slot", torch.float16, 16),  # ranks 4 and 13, one warp
    (517, 888, 232, 4, 4, [1, 3, 6], "slot", torch.float16, 128),  # 8, 16, 32; two M tiles
    (517, 2880, 768, 2, 3, [7, 4, 0], "slot", torch.bfloat16, 64),
    (133, 2880, 768, 2, 2, [3, 4], "small", torch.bfloat16, 128),  # ranks 16 and 1
    (517, 888, 232, 2, 4, [2, 4, 6], "mid", torch.bfloat16, 16),  # slot 2: rank 0 in gate only
    (133, 768, 888, 2, 2, [5, 1], "small", torch.float16, 32),  # two warps
    (517, 768, 888, 1, 1, [4, 6], "mid", torch.float16, 64),
]


@pytest.fixture
def force_mma():
    """Plan overrides for the tensor-core family (the plan's own choice also weighs the batch
    size)."""
    return {"lora_kernel": "mma"}


@pytest.mark.parametrize("stage", ["w13", "w2"])
@pytest.mark.parametrize(
    "tokens,hidden,inter,top_k,experts,slots,ranks,dtype,block_m", _MMA_CASES
)
@pytest.mark.parametrize("split", [None, 1, 3], ids=["split-auto", "split1", "split3"])
def test_gpu_fused_moe_lora_mma_prefill_matches_cpu_and_float64(
    force_mma, split, tokens, hidden, inter, top_k, experts, slots, ranks, dtype, block_m, stage
):
    # the cluster split by the plan's rule, one CTA per tile, and 3 CTAs splitting K and columns
    force_mma = {**force_mma, "mma_split": split}
    num_pairs = tokens * top_k
    max_blocks = ops.moe_lora_align_max_blocks(num_pairs, experts, len(SLOT_RANKS), block_m)
    assert num_pairs // max_blocks >= MMA_MIN_ROWS_PER_BLOCK, "case does not reach the mma path"
    seed = tokens + hidden + inter + top_k * 7 + experts + block_m + (stage == "w2")
    prob = make_prefill_problem(
        tokens, hidden, inter, top_k, experts, slots, RANK_SETS[ranks], dtype, stage, seed
    )
    views = [gpu_view(s) for s in prob["sites"]]
    out_gpu, _ = run_fused(prob, "cuda", block_m, views, overrides=force_mma)
    out_cpu, _ = run_fused(prob, "cpu", block_m)
    assert prob["written"].any()
    check_fused_result(out_gpu, out_cpu, prob, dtype)
    # No atomics: repeated runs (with a fresh alignment each time) are bit-identical.
    for _ in range(2):
        again, _ = run_fused(prob, "cuda", block_m, views, overrides=force_mma)
        assert torch.equal(out_gpu.nan_to_num(7.0), again.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ranks,num_slices", [("slot", 3), ("slot", 4), ("small", 4)])
@pytest.mark.parametrize("split", [None, 3], ids=["split-auto", "split3"])
def test_gpu_dense_lora_mma_prefill_several_slices(force_mma, split, dtype, ranks, num_slices):
    """3-4 slices: with max rank 64 they need two passes over x (at most 128 rank columns each)."""
    force_mma = {**force_mma, "mma_split": split}
    tokens, hidden, block_m = 517, 888, 64
    rank_list = RANK_SETS[ranks]
    max_blocks = ops.moe_lora_align_max_blocks(tokens, 1, len(rank_list), block_m)
    assert tokens // max_blocks >= MMA_MIN_ROWS_PER_BLOCK
    gen = torch.Generator().manual_seed(num_slices)
    token_slot = few_adapter_slots(tokens, [4, 0, 7], num_slices)
    out_dims = [888, 64, 232, 128][:num_slices]
    orders = [rank_list, rank_list[::-1], rank_list[2:] + rank_list[:2], rank_list[5:] + rank_list[:5]]
    sites, col_offsets, x, output, prob = dense_slices_problem(
        tokens, hidden, out_dims, orders, token_slot, dtype, gen, 20)
    results = {}
    for dev in ("cpu", "cuda"):
        views = [s.view for s in sites] if dev == "cpu" else [gpu_view(s) for s in sites]
        o = copy_strided(output, dev)
        plan = plan_for(tokens, dtype, **force_mma) if dev == "cuda" else None
        sorted_rows, block_slot, _, num_blocks = ops.moe_lora_align(
            None, token_slot.to(dev), 1, len(rank_list), block_m, plan=plan
        )
        ops.dense_lora(
            copy_strided(x, dev), o, sorted_rows, block_slot, num_blocks, block_m, views,
            col_offsets, plan=plan,
        )
        results[dev] = o
    assert prob["written"].any()
    check_fused_result(results["cuda"], results["cpu"].cpu(), prob, dtype)


def dense_slices_problem(tokens, hidden, out_dims, orders, token_slot, dtype, gen, seed):
    """Dense sites of widths out_dims (slot ranks in orders[i]) into one output, 8 poisoned
    columns after each: (sites, col_offsets, x, output, prob with the float64 expectation)."""
    sites = [make_site(orders[i], 1, hidden, d, dtype, seed + i) for i, d in enumerate(out_dims)]
    col_offsets, width = [], 0
    for d in out_dims:
        col_offsets.append(width)
        width += d + 8
    x = rows(tokens, hidden, dtype, gen, 8)
    topk_ids = torch.zeros(tokens, 1, dtype=torch.int32)
    delta, written = reference_delta(x.double(), token_slot, topk_ids, None, sites, col_offsets,
                                     width, 1)
    base64 = torch.randn(tokens, width, generator=gen, dtype=torch.float64)
    base64[~written] = float("nan")
    output = rows(tokens, width, dtype, gen, 8, fill=base64)
    prob = {"written": written, "expected": (output.double() + delta).to(dtype)}
    return sites, col_offsets, x, output, prob


@pytest.mark.parametrize("kernel", ["mma", "cluster"])
@pytest.mark.parametrize("hint", [1, 3, 64])
def test_gpu_fused_moe_lora_adapter_hint_only_sizes_the_launch(kernel, hint):
    # num_adapters sizes the grid and cluster split; the batch uses 3 slots, so hint 1 is an
    # under-estimate: the kernels must still walk every block (grid-stride to the device count)
    prob = make_prefill_problem(517, 888, 232, 2, 8, [4, 7, 0], SLOT_RANKS, torch.bfloat16, "w13", 11)
    views = [gpu_view(s) for s in prob["sites"]]
    out_gpu, _ = run_fused(prob, "cuda", 64, views, num_adapters=hint,
                           overrides={"lora_kernel": kernel})
    out_cpu, _ = run_fused(prob, "cpu", 64)
    assert prob["written"].any()
    check_fused_result(out_gpu, out_cpu, prob, torch.bfloat16)


def test_gpu_fused_moe_lora_mma_captures_in_a_cuda_graph(force_mma):
    prob = make_prefill_problem(517, 2880, 768, 2, 2, [4, 7], SLOT_RANKS, torch.bfloat16, "w13", 3)
    out, eager, out0 = replay_align_and_fused(prob, experts=2, block_m=64, top_k=2,
                                              overrides=force_mma)
    assert torch.equal(out, eager)
    assert not torch.equal(out, out0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 133])
def test_gpu_dense_lora_decode_qkv_slices(tokens, dtype):
    """q, k and v of one QKV output in one decode launch (the engine's attention LoRA): three
    slices of unequal widths and mixed ranks into one output, against float64 and the CPU op."""
    hidden = 888
    gen = torch.Generator().manual_seed(tokens)
    token_slot = few_adapter_slots(tokens, [4, 0, 7], tokens)
    out_dims = [888, 232, 232]  # q wider than k and v
    orders = [SLOT_RANKS, SLOT_RANKS[::-1], SLOT_RANKS[2:] + SLOT_RANKS[:2]]
    sites, col_offsets, x, output, prob = dense_slices_problem(
        tokens, hidden, out_dims, orders, token_slot, dtype, gen, 40)
    plan = ops.plan_lora(tokens, dense=True, dtype=dtype, device=CUDA)
    assert plan.form == "unsorted"
    results = {}
    for dev in ("cpu", "cuda"):
        views = [s.view for s in sites] if dev == "cpu" else [gpu_view(s) for s in sites]
        o = copy_strided(output, dev)
        ops.fused_moe_lora_unsorted(copy_strided(x, dev), o, None, token_slot.to(dev), views,
                                    col_offsets, input_pairs_per_row=1,
                                    plan=plan if dev == "cuda" else None)
        results[dev] = o
    assert prob["written"].any()
    check_fused_result(results["cuda"], results["cpu"].cpu(), prob, dtype)
