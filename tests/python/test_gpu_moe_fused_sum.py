"""The w2 expert GEMM with the sum over top-k (expert_gemm(..., sum_top_k=K)) on the GPU: bit
for bit the same GEMM then moe_sum, from NaN-poisoned outputs and partial sums, where split-K's
finishing kernel sums (splits 2, 3, 4, 8 of every weight format, block_m 8/16/32, with and
without a strided LoRA-style addend, bfloat16 and float16) and where the native op runs the GEMM
into scratch rows and moe_sum (one split, a K too short to split, the simple and stream
kernels, the plan's fallback); close to float64 with each pair's row rounded first.
"""

from __future__ import annotations

import functools

import pytest
import torch
from moe_reference import assert_close, fused_sum_reference, random_weights
from moelora import _C
from moelora._tensor import as_optional_ref, as_ref, stream_handle
from moelora.ops import moe as moe_ops

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _sum_in_split_finish(monkeypatch):
    # the engine's default keeps the two ops on the GPU until these tests have run there
    monkeypatch.setattr(moe_ops, "SUM_IN_SPLIT_FINISH", True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to(w: moe_ops.ExpertWeights) -> moe_ops.ExpertWeights:
    move = lambda t: None if t is None else t.to(CUDA)
    return moe_ops.ExpertWeights(w.format, move(w.weight), move(w.scales), move(w.bias),
                                 w.block_n, w.block_k, w.layout, w.k)


def _routing_to(r: moe_ops.Routing) -> moe_ops.Routing:
    return moe_ops.Routing(*(t.to(CUDA) for t in (r.topk_ids, r.topk_weights, r.sorted_pairs,
                                                   r.block_expert, r.num_blocks,
                                                   r.expert_counts)), r.block_m)


def _mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    got, want = got.double().cpu(), want.double().cpu()
    bad = (got != want) & ~(torch.isnan(got) & torch.isnan(want))
    where = bad.nonzero()
    if where.numel() == 0:
        return "no mismatch"
    r, c = where[0].tolist()
    return (f"{where.shape[0]} of {got.numel()} differ; first at token {r}, column {c}: got "
            f"{got[r, c].item()}, want {want[r, c].item()}; tokens "
            f"{sorted(set(where[:, 0].tolist()))[:12]}, columns "
            f"{sorted(set(where[:, 1].tolist()))[:12]}")


def _native(h, routing, w, out, *, kernel, splits=1, topk=None, sum_top_k=0, addend=None,
            fall_back=False, workspace=None):
    """_C.moe_expert_gemm as ops.moe.expert_gemm calls it, with the kernel and the split ways
    forced (expert_gemm itself takes unsplit GPU sums apart in Python, so this reaches the
    native op's own fallback)."""
    ids = routing.topk_ids if sum_top_k else None
    _C.moe_expert_gemm(
        as_ref(h), 1, moe_ops.FORMATS[w.format], as_ref(moe_ops._bytes(w.weight)),
        as_optional_ref(w.scales), as_optional_ref(w.bias), w.block_n, w.block_k,
        moe_ops.MXFP4_LAYOUTS[w.layout], as_ref(routing.sorted_pairs),
        as_ref(routing.block_expert), as_ref(routing.num_blocks), routing.block_m,
        moe_ops.ACTIVATIONS["none"], 1.702, 7.0, as_optional_ref(topk), as_ref(out),
        stream_handle(h.device), moe_ops.KERNELS[kernel], fall_back, 0, splits,
        as_optional_ref(workspace), sum_top_k, as_optional_ref(addend), as_optional_ref(ids))
    return out


def _poisoned(*shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), dtype=dtype, device=CUDA)


def _case(fmt, dtype, inter, hidden, tokens, experts, top_k, block_m, seed):
    """(h, routing, w2, topk weights, strided addend, CPU copies of routing and w2) on the GPU."""
    gen = _gen(seed)
    h = torch.randn(tokens * top_k, inter, generator=gen).to(dtype)
    w = random_weights(fmt, experts, hidden, inter, dtype, gen, bias=True, fp8_block=(16, 32))
    cpu_routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k,
                                "topk_softmax", True, block_m)
    addend = torch.randn(tokens * top_k, hidden + 9, generator=gen).to(dtype)[:, 5:5 + hidden]
    routing = _routing_to(cpu_routing)
    return (h.to(CUDA), routing, _to(w), routing.topk_weights.view(-1), addend.to(CUDA),
            cpu_routing, w)


def _unfused(h, routing, w, topk, top_k, addend, **gemm):
    y = _poisoned(h.shape[0], w.out_dim, dtype=h.dtype)
    moe_ops.expert_gemm(h, routing, w, input_pairs_per_row=1, topk_weights=topk, out=y, **gemm)
    assert not torch.isnan(y).any(), "unwritten rows of y"
    return moe_ops.moe_sum(y, top_k, addend=addend)


SPLIT_CASES = [  # format, dtype, w2's input width (inter): k-steps none of the splits divide
    ("dense", torch.bfloat16, 888),  # 28 steps, the last one partial; 4 steps per x stage
    ("dense", torch.float16, 888),
    ("mxfp4", torch.bfloat16, 864),  # 7 steps, the last one partial; 1 per stage
    ("mxfp4_mma", torch.bfloat16, 864),
    ("mxfp4_tiled", torch.bfloat16, 864),
    ("fp8", torch.bfloat16, 896),  # 14 steps, 2 per stage
]


@pytest.mark.parametrize("fmt,dtype,inter", SPLIT_CASES)
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 16, 4), (2, 32, 4), (7, 8, 2),
                                                  (133, 16, 3)])
@pytest.mark.parametrize("block_m", [8, 16, 32])
def test_gpu_split_finish_sums_bit_for_bit(fmt, dtype, inter, tokens, experts, top_k, block_m):
    # hidden 111 (112 where MXFP4 tiles hold 16 rows) ends column tiles mid-tile
    hidden = 112 if fmt == "mxfp4_tiled" else 111
    h, routing, w, topk, addend, cpu_routing, cpu_w = _case(
        fmt, dtype, inter, hidden, tokens, experts, top_k, block_m, 7 * tokens + block_m)
    for splits in (1, 2, 3, 4, 8):
        for add in (None, addend):
            what = f"{fmt} {dtype} block_m {block_m} splits {splits} addend {add is not None}"
            want = _unfused(h, routing, w, topk, top_k, add, kernel="tensor_core",
                            splits=splits)
            workspace = torch.full((splits * h.shape[0] * w.out_dim,), float("nan"),
                                   device=CUDA)
            out = _poisoned(tokens, hidden, dtype=dtype)
            moe_ops.expert_gemm(h, routing, w, input_pairs_per_row=1, topk_weights=topk,
                                out=out, kernel="tensor_core", splits=splits,
                                workspace=workspace, sum_top_k=top_k, sum_addend=add)
            assert not torch.isnan(out).any(), f"{what}: unwritten outputs"
            assert torch.equal(out, want), f"{what}: {_mismatch(out, want)}"
            assert_close(out, fused_sum_reference(h, cpu_routing, cpu_w, topk, add, dtype),
                         what)
            first = out.clone()
            out.fill_(float("nan"))
            moe_ops.expert_gemm(h, routing, w, input_pairs_per_row=1, topk_weights=topk,
                                out=out, kernel="tensor_core", splits=splits,
                                workspace=workspace, sum_top_k=top_k, sum_addend=add)
            assert torch.equal(out, first), f"{what}: not the same bits every run"
    # the default workspace and output (allocated by expert_gemm) give the same bits
    again = moe_ops.expert_gemm(h, routing, w, input_pairs_per_row=1, topk_weights=topk,
                                kernel="tensor_core", splits=4, sum_top_k=top_k,
                                sum_addend=addend)
    assert torch.equal(again, _unfused(h, routing, w, topk, top_k, addend,
                                       kernel="tensor_core", splits=4))


@pytest.mark.parametrize("fmt", ["dense", "mxfp4_mma", "fp8"])
@pytest.mark.parametrize("block_m", [8, 16])
def test_gpu_native_sum_apart_is_the_two_ops(fmt, block_m):
    # Every form the finishing kernel does not take, through the native op's own fallback
    # (scratch rows, then moe_sum): the tiled kernel whole, split ways K cannot hold, the simple
    # and stream kernels, and a tensor-core request falling back to the simple kernel.
    inter = 864 if fmt != "dense" else 888
    h, routing, w, topk, addend, *_ = _case(fmt, torch.bfloat16, inter, 111, 7, 8, 4, block_m,
                                            block_m)
    for kernel, splits in (("tensor_core", 1), ("simple", 1), ("stream", 1)):
        want = _unfused(h, routing, w, topk, 4, addend, kernel=kernel, splits=splits)
        got = _native(h, routing, w, _poisoned(7, 111), kernel=kernel, splits=splits,
                      topk=topk, sum_top_k=4, addend=addend)
        assert torch.equal(got, want), f"{kernel}: {_mismatch(got, want)}"
    # one x stage of K: no split holds a k-step of its own, so the GEMM runs whole
    short, *_ = _case(fmt, torch.bfloat16, 64, 111, 7, 8, 4, block_m, block_m + 1)
    short_w = _to(random_weights(fmt, 8, 111, 64, torch.bfloat16, _gen(2)))
    want = _unfused(short, routing, short_w, topk, 4, addend, kernel="tensor_core")
    got = _native(short, routing, short_w, _poisoned(7, 111), kernel="tensor_core", splits=4,
                  topk=topk, sum_top_k=4, addend=addend)
    assert torch.equal(got, want), f"short K: {_mismatch(got, want)}"
    # float32 activations: the tensor-core kernel refuses, fall_back runs the simple one
    h32, w32 = h.float(), _to(random_weights("dense", 8, 111, inter, torch.float32, _gen(3)))
    want = _unfused(h32, routing, w32, topk, 4, addend.float(), kernel="simple")
    got = _native(h32, routing, w32, _poisoned(7, 111, dtype=torch.float32),
                  kernel="tensor_core", splits=4, topk=topk, sum_top_k=4,
                  addend=addend.float(), fall_back=True)
    assert torch.equal(got, want), f"fall back: {_mismatch(got, want)}"


@functools.cache
def _large_weights(fmt: str, experts: int, hidden: int, inter: int) -> moe_ops.ExpertWeights:
    return _to(random_weights(fmt, experts, hidden, inter, torch.bfloat16, _gen(1)))


@pytest.mark.parametrize("fmt,weights", [("mxfp4_tiled", "mxfp4"), ("fp8", "fp8"),
                                         ("dense", "dense")])
@pytest.mark.parametrize("tokens", [1, 2, 16, 133])
def test_gpu_planned_sum_is_the_two_ops(fmt, weights, tokens):
    # The model's call (kernel "auto" under the step's plan: split by shape at decode, whole or
    # grouped past it) against the plan's GEMM then moe_sum, gpt-oss-20b-like widths.
    experts, top_k, hidden, inter = 32, 4, 2880, 2880
    gen = _gen(tokens)
    w = _large_weights(fmt, experts, hidden, inter)
    plan = moe_ops.plan_expert_gemm(tokens * top_k, experts, weights)
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen).to(CUDA), top_k,
                            "topk_softmax", True, plan=plan)
    h = torch.randn(tokens * top_k, inter, generator=gen).bfloat16().to(CUDA)
    topk = routing.topk_weights.view(-1)
    addend = torch.randn(tokens * top_k, hidden, generator=gen).bfloat16().to(CUDA)
    for add in (None, addend):
        y = moe_ops.expert_gemm(h, routing, w, input_pairs_per_row=1, topk_weights=topk)
        want = moe_ops.moe_sum(y, top_k, addend=add)
        got = moe_ops.expert_gemm(h, routing, w, input_pairs_per_row=1, topk_weights=topk,
                                  sum_top_k=top_k, sum_addend=add)
        assert torch.equal(got, want), f"{plan} addend {add is not None}: {_mismatch(got, want)}"


def test_gpu_split_finish_sum_in_a_cuda_graph():
    # decode replays the step's graph: the fused form captures, and replays the eager bits
    h, routing, w, topk, addend, *_ = _case("mxfp4_tiled", torch.bfloat16, 864, 112, 1, 16, 4,
                                            8, 11)
    out = _poisoned(1, 112)
    workspace = torch.empty(4 * h.shape[0] * w.out_dim, device=CUDA)

    def step():
        moe_ops.expert_gemm(h, routing, w, input_pairs_per_row=1, topk_weights=topk, out=out,
                            kernel="tensor_core", splits=4, workspace=workspace,
                            sum_top_k=4, sum_addend=addend)

    step()
    eager = out.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # warm up off the default stream, as capture wants
        out.fill_(float("nan"))
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.synchronize()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
