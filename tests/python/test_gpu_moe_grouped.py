"""The prefill forms on the GPU: moe_dequantize bit for bit against the CPU op, and the grouped
expert GEMM (torch._grouped_mm on expert-sorted rows; quantized stacks dequantized in chunks)
against float64 torch, experts without rows included.
"""

from __future__ import annotations

import pytest
import torch
from moe_reference import assert_close, gemm_reference, random_weights
from moelora.ops import moe as moe_ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not hasattr(torch, "_grouped_mm"),
                                 reason="this torch has no _grouped_mm")]
CUDA = torch.device("cuda")


def _to(w: moe_ops.ExpertWeights) -> moe_ops.ExpertWeights:
    move = lambda t: None if t is None else t.to(CUDA)
    return moe_ops.ExpertWeights(w.format, move(w.weight), move(w.scales), move(w.bias),
                                 w.block_n, w.block_k, w.layout)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4_mma", "fp8", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_dequantize_matches_the_cpu_op(fmt, dtype):
    gen = torch.Generator().manual_seed(2)
    w = random_weights(fmt, 6, 40, 256, dtype, gen, bias=False, fp8_block=(16, 32))
    if w.format == "mxfp4":
        w.scales = torch.randint(100, 150, w.scales.shape, generator=gen, dtype=torch.uint8)
    cpu = moe_ops.dequantize(w, 1, 4, dtype)
    gpu = moe_ops.dequantize(_to(w), 1, 4, dtype)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("fmt", ["dense", "mxfp4", "mxfp4_mma", "fp8"])
@pytest.mark.parametrize("activation", ["none", "gpt_oss"])
def test_gpu_grouped_form_matches_reference(fmt, activation, monkeypatch):
    monkeypatch.setattr(moe_ops, "GROUPED_SCRATCH_BYTES", 3 * 2 * 80 * 512)  # 3 experts a chunk
    gen = torch.Generator().manual_seed(9)
    tokens, experts, top_k, hidden, inter = 300, 16, 4, 512, 40
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    w = random_weights(fmt, experts, 2 * inter, hidden, torch.bfloat16, gen, bias=True,
                       fp8_block=(16, 128))
    logits = torch.randn(tokens, experts, generator=gen)
    logits[:, 3] = -40.0  # expert 3 gets no rows
    routing = moe_ops.route(logits.to(CUDA), top_k, "softmax_topk", True,
                            plan=moe_ops.GemmPlan("grouped_mm", 64))
    out = torch.full((tokens * top_k, inter if activation != "none" else 2 * inter),
                     float("nan"), dtype=torch.bfloat16, device=CUDA)
    moe_ops.expert_gemm(x.to(CUDA), routing, _to(w), input_pairs_per_row=top_k,
                        activation=activation, out=out, kernel="grouped_mm")
    assert routing.expert_counts[3].item() == 0
    assert_close(out, gemm_reference(x, top_k, routing.topk_ids.cpu(), w, activation))
