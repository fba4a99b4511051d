"""The w2 expert GEMM with the sum over top-k in its epilogue (expert_gemm(..., sum_top_k=K)) on
the CPU: bit for bit expert_gemm then moe_sum, and close to float64 torch with each pair's row
rounded to the activations' dtype before the sum; every weight format, with and without bias,
routing weights and a LoRA-style addend, at awkward sizes (1, 7, 133 tokens, hidden 111, K = 1..4,
experts with no rows, poisoned outputs); the grouped form; bad arguments named.
"""

from __future__ import annotations

import pytest
import torch
from moe_reference import assert_close, fused_sum_reference, manual_routing, random_weights
from moelora import InvalidArgument
from moelora.ops import moe as moe_ops


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_ids(routing: moe_ops.Routing, ids: torch.Tensor) -> moe_ops.Routing:
    return moe_ops.Routing(**{**routing.__dict__, "topk_ids": ids})


FORMATS = [("dense", torch.float32), ("dense", torch.bfloat16), ("dense", torch.float16),
           ("mxfp4", torch.bfloat16), ("mxfp4_tiled", torch.bfloat16), ("fp8", torch.bfloat16)]


@pytest.mark.parametrize("fmt,dtype", FORMATS)
@pytest.mark.parametrize("tokens", [1, 7, 133])
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_fused_sum_is_gemm_then_sum_bit_for_bit(fmt, dtype, tokens, top_k):
    gen = _gen(tokens * 13 + top_k)
    experts, inter = 8, 96  # MXFP4 needs the input width (inter) in blocks of 32
    hidden = 112 if fmt == "mxfp4_tiled" else 111  # tiles hold 16 rows
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k, "topk_softmax",
                            True, 8)
    h = torch.randn(tokens * top_k, inter, generator=gen).to(dtype)
    for bias in (True, False):
        w2 = random_weights(fmt, experts, hidden, inter, dtype, gen, bias=bias)
        for weighted in (True, False):
            topk = routing.topk_weights.view(-1) if weighted else None
            for addend in (None, torch.randn(tokens * top_k, hidden, generator=gen).to(dtype)):
                what = f"{fmt} {dtype} bias {bias} weighted {weighted} addend {addend is not None}"
                y = moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1, topk_weights=topk)
                want = moe_ops.moe_sum(y, top_k, addend=addend)
                out = torch.full((tokens, hidden), float("nan"), dtype=dtype)  # poisoned
                got = moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1,
                                          topk_weights=topk, out=out, sum_top_k=top_k,
                                          sum_addend=addend)
                assert got is out
                assert torch.equal(out, want), what
                assert_close(out, fused_sum_reference(h, routing, w2, topk, addend, dtype), what)


def test_fused_sum_reads_strided_rows_and_pairs_of_empty_experts():
    # strided input, addend and output rows; experts 1, 2 and 4 hold no pair
    gen = _gen(5)
    ids = torch.tensor([[3, 5], [3, 0], [5, 3], [0, 3], [3, 5], [5, 0], [3, 6]])
    routing = manual_routing(ids, 2, 8, block_m=3, weights=torch.rand(7, 2, generator=gen))
    h = torch.randn(14, 100, generator=gen)[:, 4:68]
    w2 = random_weights("dense", 8, 40, 64, torch.float32, gen)
    addend = torch.randn(14, 50, generator=gen)[:, 3:43]
    out = torch.full((7, 60), float("nan"))[:, 10:50]
    topk = routing.topk_weights.view(-1)
    moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1, topk_weights=topk, out=out,
                        sum_top_k=2, sum_addend=addend)
    y = moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1, topk_weights=topk)
    assert torch.equal(out, moe_ops.moe_sum(y, 2, addend=addend))
    assert_close(out, fused_sum_reference(h, routing, w2, topk, addend, torch.float32))


def test_fused_sum_is_exact_on_whole_numbers():
    # small integers: every float32 step is exact, so the sum is known in closed form
    ids = torch.tensor([[0, 1, 2], [2, 2, 1]])
    routing = manual_routing(ids, 3, 3, block_m=2, weights=torch.ones(2, 3))
    h = torch.ones(6, 32, dtype=torch.bfloat16)
    weight = torch.stack([torch.full((5, 32), float(e + 1)) for e in range(3)]).bfloat16()
    bias = torch.tensor([[1.0] * 5, [2.0] * 5, [3.0] * 5]).bfloat16()
    w2 = moe_ops.ExpertWeights("dense", weight, bias=bias)
    addend = torch.ones(6, 5, dtype=torch.bfloat16)
    out = moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1, sum_top_k=3,
                              sum_addend=addend, topk_weights=routing.topk_weights.view(-1))
    # expert e gives 32 (e + 1) + (e + 1) = 33 (e + 1), exact in bfloat16; + 1 per pair from the
    # addend; one rounding of the float32 sums 201 and 267, the latter to the even 268
    assert out.tolist() == [[33.0 * 6 + 3] * 5, [268.0] * 5]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
@pytest.mark.parametrize("fmt", ["dense", "mxfp4"])
def test_grouped_form_sums_over_k_as_moe_sum(fmt):
    gen = _gen(9)
    tokens, experts, top_k, hidden, inter = 7, 8, 3, 48, 64
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k, block_m=64)
    h = torch.randn(tokens * top_k, inter, generator=gen).bfloat16()
    w2 = random_weights(fmt, experts, hidden, inter, torch.bfloat16, gen)
    topk = routing.topk_weights.view(-1)
    addend = torch.randn(tokens * top_k, hidden, generator=gen).bfloat16()
    y = moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1, topk_weights=topk,
                            kernel=moe_ops.GROUPED)
    got = moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1, topk_weights=topk,
                              kernel=moe_ops.GROUPED, sum_top_k=top_k, sum_addend=addend)
    assert torch.equal(got, moe_ops.moe_sum(y, top_k, addend=addend))


def test_fused_sum_arguments_are_named():
    gen = _gen(1)
    routing = moe_ops.route(torch.randn(4, 8, generator=gen), 2, block_m=4)
    h = torch.randn(8, 64, generator=gen)
    w2 = random_weights("dense", 8, 32, 64, torch.float32, gen)

    def gemm(routing=routing, **kw):
        return moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1, **kw)

    with pytest.raises(InvalidArgument, match="sum_top_k must be >= 0, got -1"):
        gemm(sum_top_k=-1)
    with pytest.raises(InvalidArgument, match=r"output dimension 0 must be 4 \(pairs / sum_top_k"):
        gemm(sum_top_k=2, out=torch.empty(8, 32))
    with pytest.raises(InvalidArgument, match=r"output dimension 1 must be 32"):
        gemm(sum_top_k=2, out=torch.empty(4, 31))
    with pytest.raises(InvalidArgument, match="sum_top_k = 3 must divide the 8 pairs"):
        moe_ops.expert_gemm(h, moe_ops.route(torch.randn(4, 8), 3), w2, input_pairs_per_row=1,
                            sum_top_k=3)
    with pytest.raises(InvalidArgument, match="sum_top_k needs activation none"):
        moe_ops.expert_gemm(h, routing, random_weights("dense", 8, 32, 64, torch.float32, gen),
                            input_pairs_per_row=1, activation="silu", sum_top_k=2)
    with pytest.raises(InvalidArgument, match=r"topk_ids dimension 0 must be 4 \(pairs / sum"):
        gemm(sum_top_k=2, routing=_with_ids(routing, routing.topk_ids.reshape(2, 4)))
    with pytest.raises(InvalidArgument, match="topk_ids must be int32"):
        gemm(sum_top_k=2, routing=_with_ids(routing, routing.topk_ids.long()))
    with pytest.raises(InvalidArgument, match="topk_ids must be contiguous"):
        gemm(sum_top_k=2, routing=_with_ids(routing, routing.topk_ids.T.contiguous().T))
    with pytest.raises(InvalidArgument, match=r"sum_addend dimension 0 must be 8"):
        gemm(sum_top_k=2, sum_addend=torch.randn(4, 32))
    with pytest.raises(InvalidArgument, match=r"sum_addend dimension 1 must be 32"):
        gemm(sum_top_k=2, sum_addend=torch.randn(8, 33))
    with pytest.raises(InvalidArgument, match="sum_addend must have the output's dtype float32"):
        gemm(sum_top_k=2, sum_addend=torch.randn(8, 32).bfloat16())
    with pytest.raises(InvalidArgument, match="sum_addend is given without sum_top_k"):
        gemm(sum_addend=torch.randn(8, 32))
    # the CPU checks the ids it is given against the blocks they must agree with
    ids = routing.topk_ids.clone()
    ids[1, 0] = 8
    with pytest.raises(InvalidArgument, match=r"topk_ids\[2\] = 8 is outside \[0, 8\)"):
        gemm(sum_top_k=2, routing=_with_ids(routing, ids))
    ids[1, 0] = (routing.topk_ids[1, 0] + 1) % 8
    with pytest.raises(InvalidArgument, match=r"topk_ids\[2\] = \d is not the expert of its "
                                              r"block \(\d\)"):
        gemm(sum_top_k=2, routing=_with_ids(routing, ids))
