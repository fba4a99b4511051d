"""The MoE layer's CUDA kernels against the CPU ops and float64 torch (moe_reference.py).

Routing (one-CTA and cooperative forms), the expert GEMM (tensor-core and simple kernels, every
weight format and rows-per-block shape, gated and plain epilogues, routing weights, strided and
poisoned buffers), bit-exact probes of the dequantization and the permuted-K fragment layout,
the activation and the top-k sum. Failures name the first wrong (pair, column) and the values.
"""

from __future__ import annotations

import pytest
import torch
from moe_reference import (
    TOLERANCE,
    assert_close,
    gemm_reference,
    in_mma_layout,
    in_tiled_layout,
    manual_routing,
    random_weights,
    route_reference,
)
from moelora import _C, InvalidArgument
from moelora._tensor import as_optional_ref, as_ref
from moelora.ops import moe as moe_ops

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to(w: moe_ops.ExpertWeights, device) -> moe_ops.ExpertWeights:
    move = lambda t: None if t is None else t.to(device)
    return moe_ops.ExpertWeights(w.format, move(w.weight), move(w.scales), move(w.bias),
                                 w.block_n, w.block_k, w.layout, w.k)


def _routing_to(r: moe_ops.Routing, device) -> moe_ops.Routing:
    return moe_ops.Routing(*(t.to(device) for t in (r.topk_ids, r.topk_weights, r.sorted_pairs,
                                                     r.block_expert, r.num_blocks,
                                                     r.expert_counts)), r.block_m)


def _first_mismatch(got: torch.Tensor, want: torch.Tensor, tol: float) -> str:
    bad = ((got.double().cpu() - want.double().cpu()).abs() > tol * (1 + want.abs().cpu()))
    bad |= torch.isnan(got.double().cpu()) != torch.isnan(want.double().cpu())
    where = bad.nonzero()
    if where.numel() == 0:
        return "no mismatch"
    r, c = where[0].tolist()
    return (f"{where.shape[0]} of {got.numel()} elements differ; first at pair {r}, column {c}: "
            f"got {got[r, c].item()}, want {want[r, c].item()}; bad rows "
            f"{sorted(set(where[:, 0].tolist()))[:12]}, bad columns "
            f"{sorted(set(where[:, 1].tolist()))[:12]}")


def _same_groups(gpu: moe_ops.Routing, cpu: moe_ops.Routing) -> None:
    """Equal layouts, except that an expert's pairs may come in any order on the GPU."""
    for name in ("block_expert", "num_blocks", "expert_counts"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
    block = cpu.block_expert.long().repeat_interleave(cpu.block_m)
    key = lambda pairs: (block * 2**32 + pairs.long()).sort().values
    assert torch.equal(key(gpu.sorted_pairs.cpu()), key(cpu.sorted_pairs)), "sorted_pairs"
    assert torch.equal(gpu.sorted_pairs.cpu() == -1, cpu.sorted_pairs == -1), "padding rows"


# ---- routing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [1, 7, 64, 128, 129, 133, 2048, 8192])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (32, 4), (128, 8), (512, 1), (60, 6)])
@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax"])
def test_gpu_route_matches_cpu(tokens, experts, top_k, routing):
    dtype = torch.bfloat16 if tokens % 2 else torch.float32
    logits = torch.randn(tokens, experts, generator=_gen(tokens * experts)).to(dtype)
    for block_m in (8, 64):
        cpu = moe_ops.route(logits, top_k, routing, True, block_m)
        gpu = moe_ops.route(logits.to(CUDA), top_k, routing, True, block_m)
        assert torch.equal(gpu.topk_ids.cpu(), cpu.topk_ids)
        torch.testing.assert_close(gpu.topk_weights.cpu(), cpu.topk_weights, rtol=1e-5,
                                   atol=1e-6)
        _same_groups(gpu, cpu)


def test_gpu_route_ties_nan_and_poisoned_outputs():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0],
                           [float("nan"), 0.0, float("nan"), -1.0, 0.0, 5.0],
                           [2.0] * 6] * 50)  # 150 tokens: the cooperative form too
    ids, _ = route_reference(logits, 4, "topk_softmax", True)
    for tokens in (3, 150):
        x = logits[:tokens].to(CUDA)
        r = moe_ops.route(x, 4, "topk_softmax", True, 8)
        assert torch.equal(r.topk_ids.cpu().long(), ids[:tokens])
        # poison every output, then call the op into the same buffers: all must be rewritten
        for t in (r.topk_ids, r.sorted_pairs, r.block_expert, r.num_blocks, r.expert_counts):
            t.fill_(-7)
        r.topk_weights.fill_(float("nan"))
        workspace = torch.full((4096,), 0x55, dtype=torch.uint8, device=CUDA)
        _C.moe_route(as_ref(x), 4, 1, True, 8, as_ref(r.topk_ids), as_ref(r.topk_weights),
                     as_ref(r.sorted_pairs), as_ref(r.block_expert), as_ref(r.num_blocks),
                     as_ref(r.expert_counts), torch.cuda.current_stream().cuda_stream,
                     as_optional_ref(workspace))
        _same_groups(r, moe_ops.route(logits[:tokens], 4, "topk_softmax", True, 8))
        assert not torch.isnan(r.topk_weights).any()


@pytest.mark.parametrize("kind", ["silu", "gpt_oss"])
def test_gpu_activation_and_sum_take_addends_as_the_cpu_does(kind):
    gen = _gen(11)
    h13 = (torch.randn(133, 2 * 111, generator=gen) * 4).to(torch.bfloat16)
    d13 = torch.randn(133, 2 * 111, generator=gen).to(torch.bfloat16)
    want = moe_ops.activation(h13, kind, addend=d13)
    out = torch.full(want.shape, float("nan"), dtype=torch.bfloat16, device=CUDA)
    moe_ops.activation(h13.to(CUDA), kind, out=out, addend=d13.to(CUDA))
    assert_close(out.cpu(), want.double())
    for width in (111, 128):  # scalar and 16-byte-vector sums
        y = torch.randn(7 * 4, width, generator=gen).to(torch.bfloat16)
        d2 = torch.randn(7 * 4, width, generator=gen).to(torch.bfloat16)
        got = moe_ops.moe_sum(y.to(CUDA), 4, addend=d2.to(CUDA))
        assert torch.equal(got.cpu(), moe_ops.moe_sum(y, 4, addend=d2)), f"width {width}"


def test_gpu_route_top_k_above_32_is_refused():
    with pytest.raises(InvalidArgument, match="top_k <= 32"):
        moe_ops.route(torch.randn(2, 64, device=CUDA), 33)


# ---- expert GEMM -------------------------------------------------------------------------------

CASES = [  # format (mxfp4_mma: the mma layout), activations, hidden (K), tensor core possible
    ("dense", torch.bfloat16, 888, True),
    ("dense", torch.float16, 888, True),
    ("dense", torch.float32, 111, False),
    ("mxfp4", torch.bfloat16, 864, True),
    ("mxfp4", torch.float16, 864, False),
    ("mxfp4_mma", torch.bfloat16, 864, True),
    ("mxfp4_mma", torch.float16, 864, False),
    ("fp8", torch.bfloat16, 896, True),
    ("fp8", torch.bfloat16, 888, False),  # K % 16 != 0: simple kernel only
]


@pytest.mark.parametrize("fmt,dtype,hidden,tensor_core", CASES)
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 16, 2), (7, 8, 4), (133, 16, 3)])
@pytest.mark.parametrize("activation", ["none", "silu", "gpt_oss"])
@pytest.mark.parametrize("block_m", [8, 16, 32, 64])
def test_gpu_w13_gemm(fmt, dtype, hidden, tensor_core, tokens, experts, top_k, activation,
                      block_m):
    gen = _gen(tokens + 7 * block_m)
    inter = 37  # odd: row tiles and gated column tiles end mid-tile
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w = random_weights(fmt, experts, 2 * inter, hidden, dtype, gen, bias=True,
                       fp8_block=(16, 32))
    cpu_routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k,
                                "softmax_topk", True, block_m)
    want = gemm_reference(x, top_k, cpu_routing.topk_ids, w, activation)
    cpu = moe_ops.expert_gemm(x, cpu_routing, w, input_pairs_per_row=top_k,
                              activation=activation)
    routing, wg = _routing_to(cpu_routing, CUDA), _to(w, CUDA)
    kernels = ["simple", "tensor_core"] if tensor_core else ["simple"]
    for kernel in kernels:
        out = torch.full(want.shape, float("nan"), dtype=dtype, device=CUDA)  # poisoned
        moe_ops.expert_gemm(x.to(CUDA), routing, wg, input_pairs_per_row=top_k,
                            activation=activation, out=out, kernel=kernel)
        what = f"{kernel} {fmt} {dtype} {activation} block_m {block_m}"
        tol = TOLERANCE[dtype]
        assert not torch.isnan(out).any(), f"{what}: unwritten outputs " + \
            _first_mismatch(out, want, tol)
        assert_close(out, want, what + ": " + _first_mismatch(out, want, tol))
        assert_close(out, cpu.double(), what + " vs the CPU op")
    if not tensor_core:
        with pytest.raises(InvalidArgument, match="tensor-core kernel cannot take this call"):
            moe_ops.expert_gemm(x.to(CUDA), routing, wg, input_pairs_per_row=top_k,
                                kernel="tensor_core")


@pytest.mark.parametrize("fmt", ["dense", "mxfp4", "mxfp4_mma", "fp8"])
@pytest.mark.parametrize("block_m", [8, 32, 64])
def test_gpu_w2_gemm_with_routing_weights_and_strided_rows(fmt, block_m):
    gen = _gen(block_m)
    tokens, experts, top_k, hidden, inter = 29, 32, 4, 256, 192
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k, "topk_softmax",
                            True, block_m)
    full = torch.randn(tokens * top_k, inter + 40, generator=gen).to(torch.bfloat16)
    h = full[:, 8:8 + inter]  # row stride inter + 40, 16-byte aligned
    w = random_weights(fmt, experts, hidden, inter, torch.bfloat16, gen, fp8_block=(128, 128))
    want = gemm_reference(h, 1, routing.topk_ids, w, topk_weights=routing.topk_weights)
    r = _routing_to(routing, CUDA)
    hg = full.to(CUDA)[:, 8:8 + inter]
    out = moe_ops.expert_gemm(hg, r, _to(w, CUDA), input_pairs_per_row=1,
                              topk_weights=r.topk_weights.view(-1), kernel="tensor_core")
    assert_close(out, want, f"{fmt}: " + _first_mismatch(out, want, 2e-2))


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 16, 2), (7, 8, 4), (133, 16, 3)])
@pytest.mark.parametrize("activation", ["none", "gpt_oss"])
@pytest.mark.parametrize("block_m", [8, 16, 32, 64])
@pytest.mark.parametrize("splits", [1, 3])
def test_gpu_tiled_mxfp4_gemm_equals_the_mma_layout_bit_for_bit(tokens, experts, top_k,
                                                                 activation, block_m, splits):
    # The 16-row tiles change where the kernel reads each 16-byte vector, not which: every
    # output (through split-K partial sums too) equals the mma layout's bit for bit, and both
    # match float64. 864 inputs: 7 k-steps, the last one three quarters padding; 48 gate rows
    # end a gated column tile mid-way.
    if splits > 1 and block_m == 64:
        pytest.skip("split-K runs the decode shapes")
    gen = _gen(tokens + 5 * block_m + splits)
    hidden, inter = 864, 48
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    w = random_weights("mxfp4", experts, 2 * inter, hidden, torch.bfloat16, gen, bias=True)
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k, "softmax_topk",
                            True, block_m)
    want = gemm_reference(x, top_k, routing.topk_ids, w, activation)
    r, xg = _routing_to(routing, CUDA), x.to(CUDA)
    outs = {}
    for layout, stack in (("mma", in_mma_layout(w)), ("mma_tiled", in_tiled_layout(w))):
        outs[layout] = torch.full(want.shape, float("nan"), dtype=torch.bfloat16, device=CUDA)
        moe_ops.expert_gemm(xg, r, _to(stack, CUDA), input_pairs_per_row=top_k,
                            activation=activation, out=outs[layout], kernel="tensor_core",
                            splits=splits)
    tiled = outs["mma_tiled"]
    what = f"tiled {activation} block_m {block_m} splits {splits}"
    assert torch.equal(tiled, outs["mma"]), what + ": " + _first_mismatch(tiled, outs["mma"], 0)
    assert_close(tiled, want, what + ": " + _first_mismatch(tiled, want, 2e-2))


def test_gpu_tiled_mxfp4_simple_kernel_and_dequantize_match_the_cpu():
    gen = _gen(11)
    w = in_tiled_layout(random_weights("mxfp4", 4, 32, 160, torch.bfloat16, gen))
    wg = _to(w, CUDA)
    assert torch.equal(moe_ops.dequantize(wg).cpu(), moe_ops.dequantize(w))
    x = torch.randn(7, 160, generator=gen).to(torch.bfloat16)
    routing = moe_ops.route(torch.randn(7, 4, generator=gen), 2, block_m=8)
    cpu = moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2)
    out = moe_ops.expert_gemm(x.to(CUDA), _routing_to(routing, CUDA), wg, input_pairs_per_row=2,
                              kernel="simple")
    assert_close(out, cpu.double(), "simple kernel, tiled MXFP4")
    with pytest.raises(InvalidArgument, match="stream kernel cannot take this call.*tiles"):
        moe_ops.expert_gemm(x.to(CUDA), _routing_to(routing, CUDA), wg, input_pairs_per_row=2,
                            kernel="stream")


# ---- split-K -------------------------------------------------------------------------------------

SPLIT_CASES = [  # format, hidden (K): k-steps of 64 weight bytes, none a multiple of the splits
    ("dense", 888),  # 28 steps, the last one partial; 4 steps per x stage
    ("mxfp4", 864),  # 7 steps, the last one partial; 1 per stage
    ("mxfp4_mma", 864),
    ("fp8", 896),  # 14 steps, 2 per stage
]


@pytest.mark.parametrize("fmt,hidden", SPLIT_CASES)
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 16, 2), (7, 8, 4), (133, 16, 3)])
@pytest.mark.parametrize("activation", ["none", "silu", "gpt_oss"])
@pytest.mark.parametrize("block_m", [8, 16, 32])
def test_gpu_split_k_gemm(fmt, hidden, tokens, experts, top_k, activation, block_m):
    # Every split count against float64, from NaN-poisoned outputs and partial sums: each
    # output element and each partial the finishing kernel reads must have been written. One
    # token over 16 experts leaves 14 of them empty; inter 37 ends tiles mid-tile.
    gen = _gen(3 * tokens + block_m)
    inter = 37
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    w = random_weights(fmt, experts, 2 * inter, hidden, torch.bfloat16, gen, bias=True,
                       fp8_block=(16, 32))
    cpu_routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k,
                                "softmax_topk", True, block_m)
    weighted = activation == "none"  # the w2 form: routing weights in the epilogue
    topk = cpu_routing.topk_weights.view(-1) if weighted else None
    want = gemm_reference(x, top_k, cpu_routing.topk_ids, w, activation, topk_weights=topk)
    routing, wg, xg = _routing_to(cpu_routing, CUDA), _to(w, CUDA), x.to(CUDA)
    topk_g = routing.topk_weights.view(-1) if weighted else None
    whole = moe_ops.expert_gemm(xg, routing, wg, input_pairs_per_row=top_k,
                                activation=activation, topk_weights=topk_g, kernel="tensor_core")
    def run(splits, out, workspace):
        moe_ops.expert_gemm(xg, routing, wg, input_pairs_per_row=top_k, activation=activation,
                            topk_weights=topk_g, out=out, kernel="tensor_core", splits=splits,
                            workspace=workspace)

    for splits in (1, 2, 3, 4):
        out = torch.full(want.shape, float("nan"), dtype=torch.bfloat16, device=CUDA)
        workspace = torch.full((splits * want.shape[0] * w.out_dim,), float("nan"), device=CUDA)
        run(splits, out, workspace)
        what = f"{fmt} {activation} block_m {block_m} splits {splits}"
        assert not torch.isnan(out).any(), f"{what}: unwritten outputs " + \
            _first_mismatch(out, want, 2e-2)
        assert_close(out, want, what + ": " + _first_mismatch(out, want, 2e-2))
        if splits == 1:
            assert torch.equal(out, whole), f"{what}: one split is the whole-K kernel"
        first = out.clone()
        out.fill_(float("nan"))
        run(splits, out, workspace)
        assert torch.equal(out, first), f"{what}: the splits' sum is not the same every run"
    # the default workspace (allocated by expert_gemm) gives the same bits
    again = moe_ops.expert_gemm(xg, routing, wg, input_pairs_per_row=top_k,
                                activation=activation, topk_weights=topk_g, kernel="tensor_core",
                                splits=4)
    assert torch.equal(again, first)


@pytest.mark.parametrize("fmt,hidden", [("dense", 40), ("mxfp4", 64), ("mxfp4_mma", 64),
                                        ("fp8", 64)])
def test_gpu_split_k_of_a_short_k_runs_whole(fmt, hidden):
    # K of one x stage: no split holds a k-step of its own, so the whole-K kernel runs
    gen = _gen(hidden)
    x = torch.randn(9, hidden, generator=gen).to(torch.bfloat16).to(CUDA)
    w = _to(random_weights(fmt, 4, 48, hidden, torch.bfloat16, gen, fp8_block=(16, 32)), CUDA)
    routing = _routing_to(moe_ops.route(torch.randn(9, 4, generator=gen), 2, "softmax_topk",
                                        True, 8), CUDA)  # 8-row blocks: a decode shape
    whole = moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2, kernel="tensor_core")
    split = moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2, kernel="tensor_core",
                                splits=4)
    assert torch.equal(split, whole)


@pytest.mark.parametrize("block_m", [8, 16, 32])
@pytest.mark.parametrize("splits", [2, 3, 4])
def test_gpu_split_k_whole_numbers_are_exact(block_m, splits):
    # small integers: every partial sum is exact in fp32, so the splits' sum is the CPU op's
    _check_whole_numbers(_gen(block_m + splits), 1000, block_m,  # 32 k-steps, 4 per stage
                         kernel="tensor_core", splits=splits)


def test_gpu_split_k_refusals_are_named():
    gen = _gen(8)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16).to(CUDA)
    w = _to(random_weights("dense", 4, 32, 64, torch.bfloat16, gen), CUDA)
    routing = _routing_to(moe_ops.route(torch.randn(3, 4, generator=gen), 2, block_m=64), CUDA)
    with pytest.raises(InvalidArgument, match="splits > 1 runs with block_m 8, 16 or 32"):
        moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2, kernel="tensor_core",
                            splits=2)
    with pytest.raises(InvalidArgument, match="stream kernel takes splits = 1"):
        moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2, kernel="stream", splits=2)
    with pytest.raises(InvalidArgument, match="workspace must hold"):
        moe_ops.expert_gemm(x, _routing_to(moe_ops.route(torch.randn(3, 4, generator=gen), 2,
                                                         block_m=8), CUDA),
                            w, input_pairs_per_row=2, kernel="tensor_core", splits=2,
                            workspace=torch.empty(7, device=CUDA))


# ---- exactness probes --------------------------------------------------------------------------

def _one_hot_readback(w: moe_ops.ExpertWeights, block_m: int, kernel: str) -> torch.Tensor:
    """W [E, N, K] read back through the GEMM: one-hot input rows (each product is one weight
    times 1, exact), each expert given all K rows: out[p, n] = W[e, n, p % K]."""
    e, n, k = w.num_experts, w.out_dim, w.in_dim
    x = torch.eye(k, dtype=torch.bfloat16, device=CUDA).repeat(e, 1)
    experts = torch.arange(e).repeat_interleave(k)
    routing = _routing_to(manual_routing(experts[:, None], 1, e, block_m), CUDA)
    out = moe_ops.expert_gemm(x, routing, _to(w, CUDA), input_pairs_per_row=1, kernel=kernel)
    return out.reshape(e, k, n).transpose(1, 2).cpu()


@pytest.mark.parametrize("fmt", ["dense", "mxfp4", "mxfp4_mma", "fp8"])
@pytest.mark.parametrize("block_m", [8, 64])
def test_gpu_dequantization_is_exact_through_the_fragments(fmt, block_m):
    # A wrong K permutation, nibble order, swizzle or scale shows up as a specific (n, k).
    from moe_reference import dequantize

    gen = _gen(21)
    w = random_weights(fmt, 2, 80, 256, torch.bfloat16, gen, bias=False, fp8_block=(16, 32))
    if w.format == "mxfp4":  # every code with scales on both sides of 2^(scale - 1)'s range
        w.scales = torch.randint(110, 140, w.scales.shape, generator=gen, dtype=torch.uint8)
    want = dequantize(w, torch.bfloat16)
    for kernel in ("tensor_core", "simple"):
        got = _one_hot_readback(w, block_m, kernel)
        bad = (got != want).nonzero()
        assert bad.numel() == 0, (f"{kernel} {fmt}: {bad.shape[0]} weights differ; first "
                                  f"(expert, n, k) {bad[:8].tolist()}: got "
                                  f"{[got[tuple(b)].item() for b in bad[:4]]}, want "
                                  f"{[want[tuple(b)].item() for b in bad[:4]]}")


def test_gpu_mxfp4_repack_matches_the_cpu_one():
    # the engine repacks on the device it loads to: the same int32 shifts on CUDA tensors
    blocks = torch.randint(0, 256, (5, 24, 9, 16), dtype=torch.uint8, generator=_gen(31))
    want = moe_ops.mxfp4_to_mma_layout(blocks)
    got = blocks.to(CUDA)
    moe_ops.mxfp4_to_mma_layout(got, out=got)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(moe_ops.mxfp4_from_mma_layout(got).cpu(), blocks)


@pytest.mark.parametrize("block_m", [8, 16, 32, 64])
def test_gpu_whole_numbers_are_exact(block_m):
    # Small integers: every product and sum is exact in fp32, so the tensor-core result must
    # equal the CPU op bit for bit whatever the summation order.
    _check_whole_numbers(_gen(block_m), 320, block_m, kernel="tensor_core")


def _check_whole_numbers(gen, hidden, block_m, **gemm_options):
    """41 tokens of small integers through 8 experts (top 3, 72 output columns): the GPU GEMM
    with `gemm_options` equals the CPU op bit for bit."""
    tokens, experts, top_k, n = 41, 8, 3, 72
    x = torch.randint(-3, 4, (tokens, hidden), generator=gen).to(torch.bfloat16)
    weight = torch.randint(-2, 3, (experts, n, hidden), generator=gen).to(torch.bfloat16)
    w = moe_ops.ExpertWeights("dense", weight)
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k, "softmax_topk",
                            True, block_m)
    cpu = moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=top_k)
    gpu = moe_ops.expert_gemm(x.to(CUDA), _routing_to(routing, CUDA), _to(w, CUDA),
                              input_pairs_per_row=top_k, **gemm_options)
    assert torch.equal(gpu.cpu(), cpu), _first_mismatch(gpu, cpu.double(), 0.0)


# ---- activation and sum ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["silu", "gpt_oss"])
def test_gpu_activation_and_sum_match_cpu(dtype, kind):
    h13 = (torch.randn(133 * 4, 2 * 111, generator=_gen(4)) * 4).to(dtype)
    cpu = moe_ops.activation(h13, kind)
    gpu = moe_ops.activation(h13.to(CUDA), kind)
    assert_close(gpu, cpu.double())
    y = torch.randn(133 * 4, 888, generator=_gen(5)).to(dtype)
    out = torch.full((133, 888), float("nan"), dtype=dtype, device=CUDA)
    moe_ops.moe_sum(y.to(CUDA), 4, out=out)
    assert_close(out, y.double().view(133, 4, -1).sum(1))
    assert torch.equal(out.cpu(), moe_ops.moe_sum(y, 4))  # same order, same rounding
