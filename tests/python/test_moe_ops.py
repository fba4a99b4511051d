"""The MoE layer's ops on the CPU (their reference implementations) against float64 torch.

Routing (both orders, renormalisation, ties, NaN, 1..8 of 8..128 experts), the expert GEMM in
every weight format (dense float32/float16/bfloat16, MXFP4, block FP8) with and without bias,
gated activations and routing weights, at awkward sizes (1, 7, 133 tokens; hidden 111 * 8;
experts with no rows; strided inputs; poisoned outputs), MXFP4 and FP8 unpacking bit for bit
against transformers / models.quantized, the activation and top-k sum, and clear errors.
"""

from __future__ import annotations

import pytest
import torch
from moe_reference import (
    activation_reference,
    assert_close,
    blocks_reference,
    gemm_reference,
    manual_routing,
    random_weights,
    route_reference,
)
from moelora import InvalidArgument
from moelora.models.quantized import dequantize_fp8_blocks
from moelora.ops import moe as moe_ops
from transformers.integrations.mxfp4 import convert_moe_packed_tensors


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- routing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 1), (7, 8, 2), (133, 32, 4),
                                                   (7, 128, 8), (133, 128, 8), (1, 512, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_reference(routing, tokens, experts, top_k, dtype):
    logits = torch.randn(tokens, experts, generator=_gen(tokens + experts)).to(dtype)
    for renormalize in (True, False):
        for block_m in (1, 8, 64):
            r = moe_ops.route(logits, top_k, routing, renormalize, block_m)
            ids, weights = route_reference(logits, top_k, routing, renormalize)
            assert torch.equal(r.topk_ids.long(), ids)
            torch.testing.assert_close(r.topk_weights.double(), weights, rtol=1e-5, atol=1e-6)
            max_blocks = r.block_expert.numel()
            assert max_blocks == moe_ops._C.moe_route_max_blocks(tokens * top_k, experts, block_m)
            want = blocks_reference(ids, experts, block_m, max_blocks)
            for got, ref, name in zip((r.sorted_pairs, r.block_expert, r.num_blocks,
                                       r.expert_counts), want, ("sorted_pairs", "block_expert",
                                                               "num_blocks", "expert_counts")):
                assert torch.equal(got, ref), name


def test_route_ties_go_to_the_lower_expert_and_nan_ranks_last():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0],
                           [float("nan"), 0.0, float("nan"), -1.0, 0.0, 5.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    r = moe_ops.route(logits, 4, "topk_softmax", True, 4)
    assert r.topk_ids.tolist() == [[1, 2, 4, 3], [5, 1, 4, 3], [0, 1, 2, 3]]
    torch.testing.assert_close(r.topk_weights[2], torch.full((4,), 0.25))
    # NaN logits rank last but still enter a softmax over all experts: the row's weights are NaN
    s = moe_ops.route(logits, 2, "softmax_topk", False, 4)
    assert s.topk_ids[1].tolist() == [5, 1] and torch.isnan(s.topk_weights[1]).all()
    assert not torch.isnan(s.topk_weights[0]).any()


def test_route_whole_number_logits_exact_weights():
    # two equal logits of four experts, top-2 with renormalisation: exactly 1/2 each
    logits = torch.tensor([[4.0, 1.0, 4.0, -2.0]] * 5)
    r = moe_ops.route(logits, 2, "softmax_topk", True, 2)
    assert r.topk_ids.tolist() == [[0, 2]] * 5
    assert torch.equal(r.topk_weights, torch.full((5, 2), 0.5))
    assert r.expert_counts.tolist() == [5, 0, 5, 0]
    assert r.num_blocks.item() == 6 and r.block_expert[:6].tolist() == [0, 0, 0, 2, 2, 2]


# ---- expert GEMM -------------------------------------------------------------------------------

FORMATS = [("dense", torch.float32), ("dense", torch.bfloat16), ("dense", torch.float16),
           ("mxfp4", torch.bfloat16), ("mxfp4", torch.float32), ("fp8", torch.bfloat16),
           ("fp8", torch.float32)]


def _layer_inputs(tokens, experts, top_k, hidden, gen, dtype):
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen)
    return x, logits


@pytest.mark.parametrize("fmt,dtype", FORMATS)
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 16, 2), (7, 8, 4), (133, 16, 3)])
@pytest.mark.parametrize("activation", ["none", "silu", "gpt_oss"])
def test_w13_gemm_matches_reference(fmt, dtype, tokens, experts, top_k, activation):
    gen = _gen(tokens * 31 + experts)
    hidden = 864 if fmt == "mxfp4" else 888  # 111 * 8; MXFP4 needs multiples of 32
    inter = 37
    x, logits = _layer_inputs(tokens, experts, top_k, hidden, gen, dtype)
    w13 = random_weights(fmt, experts, 2 * inter, hidden, dtype, gen, bias=activation != "none")
    routing = moe_ops.route(logits, top_k, "softmax_topk", True, 8)
    width = inter if activation != "none" else 2 * inter
    out = torch.full((tokens * top_k, width), float("nan"), dtype=dtype)  # poisoned
    moe_ops.expert_gemm(x, routing, w13, input_pairs_per_row=top_k, activation=activation,
                        swiglu_alpha=1.5, swiglu_limit=2.0, out=out)
    want = gemm_reference(x, top_k, routing.topk_ids, w13, activation, alpha=1.5, limit=2.0)
    assert_close(out, want, f"{fmt} {dtype} {activation}")
    if tokens == 1:  # most experts have no rows
        assert (routing.expert_counts == 0).sum() >= experts - top_k


@pytest.mark.parametrize("fmt,dtype", FORMATS)
def test_w2_gemm_weights_rows_by_routing_weight(fmt, dtype):
    gen = _gen(3)
    tokens, experts, top_k, hidden, inter = 7, 8, 2, 96, 64
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k, "topk_softmax",
                            True, 4)
    h = torch.randn(tokens * top_k, inter, generator=gen).to(dtype)
    w2 = random_weights(fmt, experts, hidden, inter, dtype, gen)
    y = moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1,
                            topk_weights=routing.topk_weights.view(-1))
    want = gemm_reference(h, 1, routing.topk_ids, w2, topk_weights=routing.topk_weights)
    assert_close(y, want, f"{fmt} {dtype}")


def test_gemm_reads_strided_rows_and_only_routed_experts():
    gen = _gen(5)
    big = torch.randn(7, 200, generator=gen)
    x = big[:, 8:104]  # rows 200 apart
    experts = torch.tensor([[3, 5], [3, 3], [5, 3], [0, 3], [3, 5], [5, 0], [3, 3]])
    w = random_weights("dense", 6, 20, 96, torch.float32, gen)
    routing = manual_routing(experts, 2, 6, block_m=3)
    out = moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2)
    assert_close(out, gemm_reference(x, 2, experts, w))
    # experts 1, 2, 4 have no rows: poisoning their weights changes nothing
    w.weight[[1, 2, 4]] = float("nan")
    assert torch.equal(moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=2), out)


def test_unfused_activation_equals_fused_up_to_the_h13_rounding():
    gen = _gen(7)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    w13 = random_weights("mxfp4", 4, 2 * 48, 64, torch.bfloat16, gen)
    routing = moe_ops.route(torch.randn(5, 4, generator=gen), 2, "topk_softmax", True, 8)
    fused = moe_ops.expert_gemm(x, routing, w13, input_pairs_per_row=2, activation="gpt_oss")
    h13 = moe_ops.expert_gemm(x, routing, w13, input_pairs_per_row=2)
    unfused = moe_ops.activation(h13, "gpt_oss")
    want = gemm_reference(x, 2, routing.topk_ids, w13, "gpt_oss")
    assert_close(fused, want)
    assert_close(unfused, want)


# ---- unpacking, bit for bit --------------------------------------------------------------------

def _one_hot_gemm(w: moe_ops.ExpertWeights, dtype) -> torch.Tensor:
    """[E, N, K] read back through the GEMM: input rows one-hot, each expert all of them."""
    e, n, k = w.num_experts, w.out_dim, w.in_dim
    x = torch.eye(k, dtype=dtype)
    experts = torch.arange(e).repeat_interleave(k)  # pair p: expert p // k, row p % k
    routing = manual_routing(experts[:, None], 1, e, block_m=16)
    out = moe_ops.expert_gemm(x.repeat(e, 1), routing, w, input_pairs_per_row=1)
    return out.reshape(e, k, n).transpose(1, 2)


def test_mxfp4_unpacking_is_transformers_bit_for_bit():
    gen = _gen(11)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 150, (3, 40, 4), dtype=torch.uint8, generator=gen)
    w = moe_ops.ExpertWeights("mxfp4", blocks, scales)
    for dtype in (torch.bfloat16, torch.float32):
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, K, N]
        assert torch.equal(_one_hot_gemm(w, dtype), theirs.transpose(1, 2))


def test_fp8_unpacking_is_models_quantized_bit_for_bit():
    gen = _gen(12)
    w = random_weights("fp8", 2, 48, 64, torch.bfloat16, gen, bias=False, fp8_block=(16, 16))
    for dtype in (torch.bfloat16, torch.float32):
        want = torch.stack([dequantize_fp8_blocks(a, s, dtype)
                            for a, s in zip(w.weight, w.scales)])
        assert torch.equal(_one_hot_gemm(w, dtype), want)


# ---- activation and sum ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["silu", "gpt_oss"])
def test_activation_matches_reference(dtype, kind):
    h13 = (torch.randn(133, 2 * 111, generator=_gen(2)) * 4).to(dtype)
    out = moe_ops.activation(h13, kind, 1.702, 7.0)
    assert_close(out, activation_reference(h13, kind))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_sum_over_k(dtype, top_k):
    y = torch.randn(7 * top_k, 888, generator=_gen(top_k)).to(dtype)
    out = moe_ops.moe_sum(y, top_k)
    assert_close(out, y.double().view(7, top_k, -1).sum(1))
    ones = torch.ones(3 * top_k, 16, dtype=dtype)  # whole numbers: exact
    assert torch.equal(moe_ops.moe_sum(ones, top_k), torch.full((3, 16), float(top_k),
                                                                dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["silu", "gpt_oss"])
def test_activation_adds_its_addend_in_float32(dtype, kind):
    # The LoRA delta of h13 as an addend: act(h13 + addend) with the sum in float32 (float32:
    # the same bits as adding it to h13 first); strided rows of both.
    gen = _gen(5)
    h13 = (torch.randn(133, 2 * 111, generator=gen) * 4).to(dtype)
    addend = torch.randn(133, 2 * 120, generator=gen).to(dtype)[:, :2 * 111]
    out = moe_ops.activation(h13, kind, addend=addend)
    assert_close(out, activation_reference(h13.double() + addend.double(), kind))
    if dtype == torch.float32:
        assert torch.equal(out, moe_ops.activation(h13 + addend, kind))
    assert torch.equal(moe_ops.activation(h13, kind, addend=torch.zeros_like(h13)),
                       moe_ops.activation(h13, kind))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 4])
def test_sum_over_k_adds_its_addend(dtype, top_k):
    gen = _gen(6)
    y = torch.randn(7 * top_k, 111, generator=gen).to(dtype)
    addend = torch.randn(7 * top_k, 111, generator=gen).to(dtype)
    out = moe_ops.moe_sum(y, top_k, addend=addend)
    assert_close(out, (y.double() + addend.double()).view(7, top_k, -1).sum(1))
    if dtype == torch.float32:
        assert torch.equal(out, moe_ops.moe_sum(y + addend, top_k))


def test_addends_of_the_wrong_shape_or_dtype_are_named():
    h13 = torch.randn(5, 8)
    with pytest.raises(InvalidArgument, match="moe_activation.*addend"):
        moe_ops.activation(h13, "silu", addend=torch.randn(5, 6))
    with pytest.raises(InvalidArgument, match="moe_activation.*addend must have h13's dtype"):
        moe_ops.activation(h13, "silu", addend=torch.randn(5, 8, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgument, match="moe_sum.*addend"):
        moe_ops.moe_sum(torch.randn(6, 4), 2, addend=torch.randn(3, 4))


# ---- errors ----------------------------------------------------------------------------------

def test_bad_arguments_are_named():
    gen = _gen(1)
    x = torch.randn(4, 64, generator=gen)
    routing = moe_ops.route(torch.randn(4, 8, generator=gen), 2, "softmax_topk", True, 4)
    dense = random_weights("dense", 8, 32, 64, torch.float32, gen)
    with pytest.raises(InvalidArgument, match="top_k must be in"):
        moe_ops.route(torch.randn(4, 8), 9)
    with pytest.raises(InvalidArgument, match="1 to 512 experts"):
        moe_ops.route(torch.randn(4, 513), 2)
    with pytest.raises(InvalidArgument, match="dense weight must have the input's dtype"):
        moe_ops.expert_gemm(x.bfloat16(), routing, dense, input_pairs_per_row=2)
    with pytest.raises(InvalidArgument, match=r"weight dimension 2 must be 48 \(the input width\)"):
        moe_ops.expert_gemm(torch.randn(4, 48), routing, dense, input_pairs_per_row=2)
    with pytest.raises(InvalidArgument, match="output dimension 0 must be 8"):
        moe_ops.expert_gemm(x, routing, dense, input_pairs_per_row=2, out=torch.empty(7, 32))
    with pytest.raises(InvalidArgument, match="MXFP4 needs an input width"):
        mx = random_weights("mxfp4", 8, 32, 64, torch.float32, gen)
        moe_ops.expert_gemm(torch.randn(4, 48), routing, mx, input_pairs_per_row=2)
    with pytest.raises(InvalidArgument, match=r"scales dimension 2 must be 2 \(ceil\(K"):
        fp8 = random_weights("fp8", 8, 32, 64, torch.float32, gen, fp8_block=(16, 16))
        fp8.block_k = 32
        moe_ops.expert_gemm(x, routing, fp8, input_pairs_per_row=2)
    with pytest.raises(InvalidArgument, match="topk_weights dimension 0 must be 8"):
        moe_ops.expert_gemm(x, routing, dense, input_pairs_per_row=2,
                            topk_weights=torch.ones(7))
    bad = moe_ops.Routing(**{**routing.__dict__, "block_expert": routing.block_expert.clone()})
    bad.block_expert[0] = 8
    with pytest.raises(InvalidArgument, match=r"block_expert\[0\] = 8 is outside \[0, 8\)"):
        moe_ops.expert_gemm(x, bad, dense, input_pairs_per_row=2)
    bad = moe_ops.Routing(**{**routing.__dict__, "sorted_pairs": routing.sorted_pairs.clone()})
    bad.sorted_pairs[0] = 99
    with pytest.raises(InvalidArgument, match=r"sorted_pairs\[0\] = 99 is outside"):
        moe_ops.expert_gemm(x, bad, dense, input_pairs_per_row=2)
    with pytest.raises(InvalidArgument, match="h13 dimension 1 must be 64"):
        moe_ops.activation(torch.randn(4, 63), "silu", out=torch.empty(4, 32))
    with pytest.raises(ValueError, match="activation must be one of"):
        moe_ops.activation(torch.randn(4, 64), "relu")
    with pytest.raises(InvalidArgument, match="y dimension 0 must be 6"):
        moe_ops.moe_sum(torch.randn(7, 8), 2, out=torch.empty(3, 8))
