"""The persistent stream expert GEMM (cuda/moe/stream.cuh) against float64 torch, the CPU op and
the tiled kernel: every weight format, gated and plain epilogues, 8- and 16-row blocks, odd
widths (tiles ending mid-tile, K ending mid-step), experts with no rows, many blocks per CTA
(x slots recycled), one x slot with many stages per row, any number of consumer warps, bit-exact
dequantization through its fragments, refusals and the planned fall-back.
"""

from __future__ import annotations

import pytest
import torch
from moe_reference import (
    TOLERANCE,
    assert_close,
    dequantize,
    gemm_reference,
    manual_routing,
    random_weights,
)
from moelora import InvalidArgument
from moelora.ops import moe as moe_ops

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to(w: moe_ops.ExpertWeights) -> moe_ops.ExpertWeights:
    move = lambda t: None if t is None else t.to(CUDA)
    return moe_ops.ExpertWeights(w.format, move(w.weight), move(w.scales), move(w.bias),
                                 w.block_n, w.block_k, w.layout)


def _routing_to(r: moe_ops.Routing) -> moe_ops.Routing:
    return moe_ops.Routing(*(t.to(CUDA) for t in (r.topk_ids, r.topk_weights, r.sorted_pairs,
                                                   r.block_expert, r.num_blocks,
                                                   r.expert_counts)), r.block_m)


def _mismatch(got: torch.Tensor, want: torch.Tensor, tol: float) -> str:
    got, want = got.double().cpu(), want.double().cpu()
    bad = (got - want).abs() > tol * (1 + want.abs())
    bad |= torch.isnan(got) != torch.isnan(want)
    where = bad.nonzero()
    if where.numel() == 0:
        return "no mismatch"
    r, c = where[0].tolist()
    return (f"{where.shape[0]} of {got.numel()} differ; first at pair {r}, column {c}: got "
            f"{got[r, c].item()}, want {want[r, c].item()}; rows "
            f"{sorted(set(where[:, 0].tolist()))[:12]}, columns "
            f"{sorted(set(where[:, 1].tolist()))[:12]}")


def _gemm(x, routing, w, ipr, activation="none", topk=None, kernel="stream", consumers=0,
          width=None):
    if width is None:
        width = w.out_dim // 2 if activation != "none" else w.out_dim
    out = torch.full((x.shape[0] * ipr, width), float("nan"), dtype=x.dtype, device=CUDA)
    moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=ipr, activation=activation,
                        topk_weights=topk, out=out, kernel=kernel, stream_consumers=consumers)
    return out


CASES = [  # format (mxfp4_mma: the mma layout), activations, K
    ("dense", torch.bfloat16, 888),
    ("dense", torch.float16, 888),
    ("mxfp4", torch.bfloat16, 864),
    ("mxfp4_mma", torch.bfloat16, 864),
    ("fp8", torch.bfloat16, 896),
]


@pytest.mark.parametrize("fmt,dtype,hidden", CASES)
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 16, 2), (7, 8, 4), (133, 16, 3)])
@pytest.mark.parametrize("activation", ["none", "silu", "gpt_oss"])
@pytest.mark.parametrize("block_m", [8, 16])
def test_gpu_stream_matches_reference_and_tiles(fmt, dtype, hidden, tokens, experts, top_k,
                                                activation, block_m):
    gen = _gen(tokens + 3 * block_m)
    inter = 37  # odd: gated tiles of 8 and plain tiles of 16 rows both end mid-tile
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w = random_weights(fmt, experts, 2 * inter, hidden, dtype, gen, bias=True,
                       fp8_block=(16, 32))
    cpu_routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k,
                                "softmax_topk", True, block_m)
    want = gemm_reference(x, top_k, cpu_routing.topk_ids, w, activation)
    routing, wg, xg = _routing_to(cpu_routing), _to(w), x.to(CUDA)
    what = f"stream {fmt} {dtype} {activation} block_m {block_m}"
    got = _gemm(xg, routing, wg, top_k, activation)
    assert not torch.isnan(got).any(), f"{what}: unwritten outputs: " + \
        _mismatch(got, want, TOLERANCE[dtype])
    assert_close(got, want, what + ": " + _mismatch(got, want, TOLERANCE[dtype]))
    tiles = _gemm(xg, routing, wg, top_k, activation, kernel="tensor_core")
    if w.format == "mxfp4":  # lanes 2, 3 take their words in another order: other roundings
        assert_close(got, tiles.double(), what + " vs tiles")
    else:  # the same mma sequence per output: bit for bit
        assert torch.equal(got, tiles), what + " vs tiles: " + _mismatch(got, tiles, 0.0)


@pytest.mark.parametrize("fmt", ["dense", "mxfp4", "mxfp4_mma", "fp8"])
@pytest.mark.parametrize("block_m", [8, 16])
def test_gpu_stream_w2_weights_rows_and_reads_strided_input(fmt, block_m):
    gen = _gen(block_m)
    tokens, experts, top_k, hidden, inter = 29, 32, 4, 256, 192
    cpu_routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k,
                                "topk_softmax", True, block_m)
    full = torch.randn(tokens * top_k, inter + 40, generator=gen).to(torch.bfloat16)
    w = random_weights(fmt, experts, hidden, inter, torch.bfloat16, gen, fp8_block=(128, 128))
    want = gemm_reference(full[:, 8:8 + inter], 1, cpu_routing.topk_ids, w,
                          topk_weights=cpu_routing.topk_weights)
    r = _routing_to(cpu_routing)
    h = full.to(CUDA)[:, 8:8 + inter]  # rows inter + 40 apart, 16-byte aligned
    got = _gemm(h, r, _to(w), 1, topk=r.topk_weights.view(-1))
    assert_close(got, want, f"{fmt}: " + _mismatch(got, want, 2e-2))


def test_gpu_stream_many_blocks_per_cta_recycle_the_x_slots():
    # one 16-row tile per block and ~500 blocks: every CTA walks several blocks through its two
    # x slots
    gen = _gen(41)
    tokens, experts, top_k, hidden, n = 1000, 128, 4, 256, 16
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    w = random_weights("dense", experts, n, hidden, torch.bfloat16, gen)
    cpu_routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k,
                                "softmax_topk", True, 8)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert cpu_routing.num_blocks.item() > 3 * sms
    want = gemm_reference(x, top_k, cpu_routing.topk_ids, w)
    got = _gemm(x.to(CUDA), _routing_to(cpu_routing), _to(w), top_k)
    assert_close(got, want, _mismatch(got, want, 2e-2))


def test_gpu_stream_one_x_slot_and_many_stages_per_row():
    # K = 4096 bf16 with 16-row blocks: one x slot of 128 KB leaves room for 128-byte stages
    gen = _gen(43)
    tokens, experts, top_k, hidden, n = 300, 64, 4, 4096, 48
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    w = random_weights("dense", experts, n, hidden, torch.bfloat16, gen)
    cpu_routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k,
                                "softmax_topk", True, 16)
    want = gemm_reference(x, top_k, cpu_routing.topk_ids, w)
    routing, wg, xg = _routing_to(cpu_routing), _to(w), x.to(CUDA)
    got = _gemm(xg, routing, wg, top_k)
    assert_close(got, want, _mismatch(got, want, 2e-2))
    assert torch.equal(got, _gemm(xg, routing, wg, top_k, kernel="tensor_core"))


@pytest.mark.parametrize("fmt", ["dense", "mxfp4", "mxfp4_mma", "fp8"])
def test_gpu_stream_any_consumer_count_gives_the_same_bits(fmt):
    gen = _gen(47)
    tokens, experts, top_k, hidden, inter = 64, 32, 4, 512, 96
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).to(CUDA)
    w = _to(random_weights(fmt, experts, 2 * inter, hidden, torch.bfloat16, gen,
                           fp8_block=(128, 128)))
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen).to(CUDA), top_k,
                            "topk_softmax", True, 16)
    first = _gemm(x, routing, w, top_k, "gpt_oss", consumers=1)
    for consumers in (2, 5, 8, 12):
        got = _gemm(x, routing, w, top_k, "gpt_oss", consumers=consumers)
        assert torch.equal(got, first), f"{consumers} consumers: " + _mismatch(got, first, 0.0)


@pytest.mark.parametrize("fmt", ["dense", "mxfp4", "mxfp4_mma", "fp8"])
@pytest.mark.parametrize("block_m", [8, 16])
def test_gpu_stream_dequantization_is_exact_through_the_fragments(fmt, block_m):
    # one-hot input rows: out[p, n] = W[e, n, p % K] exactly; a wrong word order, nibble,
    # pitch or stage scale shows up as a specific (n, k)
    gen = _gen(21)
    w = random_weights(fmt, 2, 80, 256, torch.bfloat16, gen, bias=False, fp8_block=(16, 32))
    if w.format == "mxfp4":  # every code, scales on both sides of 2^(scale - 1)'s range
        w.scales = torch.randint(110, 140, w.scales.shape, generator=gen, dtype=torch.uint8)
    e, n, k = w.num_experts, w.out_dim, w.in_dim
    x = torch.eye(k, dtype=torch.bfloat16, device=CUDA).repeat(e, 1)
    routing = _routing_to(manual_routing(torch.arange(e).repeat_interleave(k)[:, None], 1, e,
                                         block_m))
    got = _gemm(x, routing, _to(w), 1).reshape(e, k, n).transpose(1, 2).cpu()
    want = dequantize(w, torch.bfloat16)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, (f"{fmt}: {bad.shape[0]} weights differ; first (expert, n, k) "
                              f"{bad[:8].tolist()}")


def test_gpu_stream_whole_numbers_are_exact():
    gen = _gen(8)
    tokens, experts, top_k, hidden, n = 41, 8, 3, 320, 72
    x = torch.randint(-3, 4, (tokens, hidden), generator=gen).to(torch.bfloat16)
    w = moe_ops.ExpertWeights("dense", torch.randint(-2, 3, (experts, n, hidden), generator=gen)
                              .to(torch.bfloat16))
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k, "softmax_topk",
                            True, 16)
    cpu = moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=top_k)
    got = _gemm(x.to(CUDA), _routing_to(routing), _to(w), top_k)
    assert torch.equal(got.cpu(), cpu), _mismatch(got, cpu, 0.0)


def test_gpu_stream_refusals_and_the_planned_fall_back():
    gen = _gen(5)
    x = torch.randn(9, 256, generator=gen).to(torch.bfloat16).to(CUDA)
    w = _to(random_weights("dense", 8, 64, 256, torch.bfloat16, gen))
    logits = torch.randn(9, 8, generator=gen).to(CUDA)
    r32 = moe_ops.route(logits, 2, "softmax_topk", True, 32)
    with pytest.raises(InvalidArgument, match="stream kernel cannot take this call: block_m"):
        _gemm(x, r32, w, 2)
    with pytest.raises(InvalidArgument, match="stream kernel cannot take this call: activ"):
        _gemm(x.float(), moe_ops.route(logits, 2, "softmax_topk", True, 8),
              moe_ops.ExpertWeights("dense", w.weight.float()), 2)
    huge = _to(random_weights("dense", 8, 16, 16384, torch.bfloat16, gen, bias=False))
    with pytest.raises(InvalidArgument, match="do not fit in shared memory"):
        _gemm(torch.randn(9, 16384, device=CUDA).bfloat16(),
              moe_ops.route(logits, 2, "softmax_topk", True, 16), huge, 2)
    # planned: the tiled kernel takes over, with the same result as asking for it
    planned = moe_ops.route(logits, 2, "softmax_topk", True, 32, moe_ops.GemmPlan("stream", 16))
    got = moe_ops.expert_gemm(x, planned, w, input_pairs_per_row=2)
    assert torch.equal(got, _gemm(x, planned, w, 2, kernel="tensor_core"))
