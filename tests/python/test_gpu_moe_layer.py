"""One whole MoE layer on the GPU (route -> w13 + activation -> w2 x routing weight -> sum) at the
presets' real shapes, in every weight format, against float64 torch; the same layer captured in
a CUDA graph and replayed on new inputs; and models with quantized experts on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from moe_reference import activation_reference, assert_close, gemm_reference, random_weights
from moelora.models import ReferenceContext
from moelora.models.synthetic import build_synthetic
from moelora.ops import moe as moe_ops

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")

# preset: (hidden, inter, experts, top_k, routing, activation, formats)
PRESETS = {
    "gpt-oss-20b": (2880, 2880, 32, 4, "topk_softmax", "gpt_oss", ("mxfp4", "dense")),
    "qwen3-30b-a3b": (2048, 768, 128, 8, "softmax_topk", "silu", ("fp8", "dense")),
}


def _weights(fmt, experts, n, k, gen, bias):
    w = random_weights(fmt, experts, n, k, torch.bfloat16, gen, bias=bias, fp8_block=(128, 128))
    move = lambda t: None if t is None else t.to(CUDA)
    return moe_ops.ExpertWeights(w.format, move(w.weight), move(w.scales), move(w.bias),
                                 w.block_n, w.block_k)


def _layer(x, logits, w13, w2, top_k, routing, activation, lora_form=False):
    """The model's sequence of ops (models/moe.py Experts.forward)."""
    r = moe_ops.route(logits, top_k, routing, True)
    if lora_form:  # h13, then the activation: where a LoRA delta would go in between
        h13 = moe_ops.expert_gemm(x, r, w13, input_pairs_per_row=top_k)
        h = moe_ops.activation(h13, activation)
    else:
        h = moe_ops.expert_gemm(x, r, w13, input_pairs_per_row=top_k, activation=activation)
    y = moe_ops.expert_gemm(h, r, w2, input_pairs_per_row=1,
                            topk_weights=r.topk_weights.view(-1))
    return moe_ops.moe_sum(y, top_k), r, h


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tokens", [1, 16, 64, 512])
def test_gpu_layer_at_real_shapes(preset, tokens):
    hidden, inter, experts, top_k, routing, activation, formats = PRESETS[preset]
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).to(CUDA)
    logits = torch.randn(tokens, experts, generator=gen).to(CUDA)
    bias = preset == "gpt-oss-20b"
    for fmt in formats:
        w13 = _weights(fmt, experts, 2 * inter, hidden, gen, bias)
        w2 = _weights(fmt, experts, hidden, inter, gen, bias)
        out, r, h = _layer(x, logits, w13, w2, top_k, routing, activation)
        # the reference takes the GPU's routing (checked against the CPU op elsewhere) and the
        # GPU's h, so that each GEMM is judged on its own inputs
        want_h = gemm_reference(x, top_k, r.topk_ids, w13, activation)
        assert_close(h, want_h, f"{preset} {fmt} w13, {tokens} tokens")
        want_y = gemm_reference(h, 1, r.topk_ids, w2, topk_weights=r.topk_weights)
        want = want_y.view(tokens, top_k, -1).sum(1)
        assert_close(out, want, f"{preset} {fmt} layer, {tokens} tokens")
        unfused, _, _ = _layer(x, logits, w13, w2, top_k, routing, activation, lora_form=True)
        assert_close(unfused, want, f"{preset} {fmt} unfused layer, {tokens} tokens")


@pytest.mark.parametrize("fmt", ["mxfp4", "dense", "fp8"])
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_gpu_layer_replays_from_a_cuda_graph(fmt, tokens):
    hidden, inter, experts, top_k = 512, 256, 32, 4
    gen = torch.Generator().manual_seed(5)
    w13 = _weights(fmt, experts, 2 * inter, hidden, gen, True)
    w2 = _weights(fmt, experts, hidden, inter, gen, True)
    x = torch.zeros(tokens, hidden, dtype=torch.bfloat16, device=CUDA)
    logits = torch.zeros(tokens, experts, device=CUDA)
    args = (w13, w2, top_k, "topk_softmax", "gpt_oss")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        _layer(x, logits, *args)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _, _ = _layer(x, logits, *args)
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        x.copy_(torch.randn(tokens, hidden, generator=g))
        logits.copy_(torch.randn(tokens, experts, generator=g))
        captured.fill_(float("nan"))  # poison: the replay must write every output
        graph.replay()
        torch.cuda.synchronize()
        eager, _, _ = _layer(x, logits, *args)
        assert torch.equal(captured, eager), f"{fmt}: replay differs from the eager layer"


@pytest.mark.parametrize("expert_weights", ["mxfp4", "fp8", "dense"])
def test_gpu_model_with_quantized_experts_matches_cpu_float32(expert_weights):
    # The same synthetic weights: bf16 on the GPU (tensor-core kernels) against float32 on the
    # CPU (the reference ops); with and without a LoRA-shaped (unfused) step.
    import copy

    cpu = build_synthetic("tiny-moe", dtype=torch.float32, num_layers=2,
                          expert_weights=expert_weights)
    gpu = copy.deepcopy(cpu)
    for name, param in gpu.named_parameters():  # bf16, but FP8 block scales stay float32
        if param.dtype == torch.float32 and not name.endswith("_scale_inv"):
            param.data = param.data.to(torch.bfloat16)
    gpu = gpu.to(CUDA)
    ids = torch.randint(0, 1000, (37,), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(37)
    outs = []
    for model, device in ((cpu, "cpu"), (gpu, CUDA)):
        ctx = ReferenceContext()
        ctx.begin_step(torch.zeros_like(pos), pos)
        outs.append(model(ids.to(device), pos.to(device), ctx).float().cpu())
    error = (outs[1] - outs[0]).norm() / outs[0].norm()
    assert error < 2e-2, f"{expert_weights}: relative error {error:.4f} of bf16 GPU vs fp32 CPU"


def test_gpu_activation_reference_agrees_at_the_clamp():
    h13 = torch.tensor([[-8.0, 6.9, 7.0, 7.1, 100.0, -100.0, 7.1, -7.2]], device=CUDA)
    out = moe_ops.activation(h13, "gpt_oss")
    assert_close(out, activation_reference(h13, "gpt_oss"))


def test_gpu_bench_moe_runs(capsys):
    from moelora.bench import moe as bench_moe

    bench_moe.main(["--presets", "qwen3-30b-a3b", "--tokens", "1", "64", "--iters", "2",
                    "--settle-s", "0", "--weights", "fp8"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    import json

    record = json.loads(lines[1])
    assert record["weights"] == "fp8" and record["layer_us"] > 0 and record["roofline_us"] > 0
