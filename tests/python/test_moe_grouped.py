"""The prefill forms of the expert GEMM on the CPU: moe_dequantize (experts in their dense form,
bit for bit what the GEMM multiplies by) and the grouped form (torch._grouped_mm on
expert-sorted rows, quantized stacks dequantized in bounded chunks) against float64 torch, at
awkward sizes, with experts that get no rows and poisoned outputs.
"""

from __future__ import annotations

import pytest
import torch
from moe_reference import assert_close, dequantize, gemm_reference, random_weights
from moelora import InvalidArgument
from moelora.ops import moe as moe_ops

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"),
                                reason="this torch has no _grouped_mm")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_is_what_the_gemm_multiplies_by(fmt, dtype):
    gen = _gen(3)
    w = random_weights(fmt, 5, 24, 96, dtype, gen, bias=False, fp8_block=(16, 32))
    if fmt == "mxfp4":  # scales on both sides of 2^(scale - 1)'s bf16 range
        w.scales = torch.randint(110, 140, w.scales.shape, generator=gen, dtype=torch.uint8)
    want = dequantize(w, dtype)
    assert torch.equal(moe_ops.dequantize(w, dtype=dtype), want)
    assert torch.equal(moe_ops.dequantize(w, 2, 3, dtype), want[2:5])
    assert moe_ops.dequantize(w, 5, 0, dtype).shape == (0, 24, 96)


def test_dequantize_names_bad_arguments():
    w = random_weights("mxfp4", 4, 8, 64, torch.bfloat16, _gen(1), bias=False)
    with pytest.raises(InvalidArgument, match=r"experts \[3, 5\) are outside the 4"):
        moe_ops.dequantize(w, 3, 2)
    out = torch.empty(2, 9, 64, dtype=torch.bfloat16)
    with pytest.raises(InvalidArgument, match="out dimension 1 must be 8"):
        moe_ops._C.moe_dequantize(1, moe_ops.as_ref(w.weight), moe_ops.as_optional_ref(w.scales),
                                  0, 0, 0, 0, moe_ops.as_ref(out), 0)
    dense = random_weights("dense", 4, 8, 64, torch.float32, _gen(2), bias=False)
    with pytest.raises(InvalidArgument, match="dense weight must have the input's dtype"):
        moe_ops.dequantize(dense, dtype=torch.bfloat16)


@pytest.mark.parametrize("fmt,dtype", [("dense", torch.float32), ("dense", torch.bfloat16),
                                       ("mxfp4", torch.bfloat16), ("fp8", torch.bfloat16)])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 16, 2), (7, 8, 4), (133, 16, 3)])
@pytest.mark.parametrize("activation", ["none", "silu", "gpt_oss"])
def test_grouped_form_matches_reference(fmt, dtype, tokens, experts, top_k, activation):
    gen = _gen(tokens + experts)
    hidden, inter = (864 if fmt == "mxfp4" else 888), 40
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w = random_weights(fmt, experts, 2 * inter, hidden, dtype, gen, bias=True, fp8_block=(16, 32))
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k, "softmax_topk",
                            True, plan=moe_ops.GemmPlan("grouped_mm", 64))
    width = inter if activation != "none" else 2 * inter
    out = torch.full((tokens * top_k, width), float("nan"), dtype=dtype)  # poisoned
    moe_ops.expert_gemm(x, routing, w, input_pairs_per_row=top_k, activation=activation,
                        out=out, kernel="grouped_mm")
    want = gemm_reference(x, top_k, routing.topk_ids, w, activation)
    assert_close(out, want, f"grouped {fmt} {dtype} {activation}")
    if tokens == 1:
        assert (routing.expert_counts == 0).sum() >= experts - top_k


def test_grouped_w2_with_routing_weights_in_small_chunks(monkeypatch):
    # a scratch of two experts at a time and an epilogue of 7 rows at a time: every chunk
    # boundary, and chunks with no rows
    gen = _gen(9)
    tokens, experts, top_k, hidden, inter = 29, 12, 4, 64, 96
    monkeypatch.setattr(moe_ops, "GROUPED_SCRATCH_BYTES", 2 * hidden * inter * 2)
    monkeypatch.setattr(moe_ops, "GROUPED_EPILOGUE_ROWS", 7)
    logits = torch.randn(tokens, experts, generator=gen)
    logits[:, 5:8] = -30.0  # experts 5..7 get no rows
    routing = moe_ops.route(logits, top_k, "topk_softmax", True)
    h = torch.randn(tokens * top_k, inter, generator=gen).to(torch.bfloat16)
    w2 = random_weights("mxfp4", experts, hidden, inter, torch.bfloat16, gen)
    y = moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1, kernel="grouped_mm",
                            topk_weights=routing.topk_weights.view(-1))
    assert (routing.expert_counts[5:8] == 0).all()
    assert_close(y, gemm_reference(h, 1, routing.topk_ids, w2, topk_weights=routing.topk_weights))


def test_planned_grouped_form_falls_back_when_it_cannot_run():
    # widths that are not multiples of 8: a planned grouped step runs the native kernels, a
    # grouped step asked for by name is an error
    gen = _gen(4)
    x = torch.randn(5, 36, generator=gen)
    w = random_weights("dense", 4, 10, 36, torch.float32, gen)
    logits = torch.randn(5, 4, generator=gen)
    planned = moe_ops.route(logits, 2, plan=moe_ops.GemmPlan("grouped_mm", 64))
    out = moe_ops.expert_gemm(x, planned, w, input_pairs_per_row=2)
    assert_close(out, gemm_reference(x, 2, planned.topk_ids, w))
    with pytest.raises(ValueError, match="grouped GEMM cannot take this call: widths"):
        moe_ops.expert_gemm(x, planned, w, input_pairs_per_row=2, kernel="grouped_mm")
