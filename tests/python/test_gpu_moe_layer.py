"""One whole MoE layer on the GPU (route -> w13 + activation -> w2 x routing weight -> sum) at the
presets' real shapes, in every weight format and every form the plan picks (stream, tiles,
grouped), against float64 torch; the same layer captured in a CUDA graph and replayed on new
inputs; and models with quantized experts on the GPU against the float32 CPU model on the same
routing (moelora.bench.moe_parity), with any routing difference a near-tie.
"""

from __future__ import annotations

import pytest
import torch
from moe_reference import activation_reference, assert_close, gemm_reference, random_weights
from moelora.bench import moe_parity
from moelora.ops import moe as moe_ops

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")

# preset: (hidden, inter, experts, top_k, routing, activation, formats)
PRESETS = {
    # mxfp4_mma: MXFP4 in the mma layout, as the engine holds it (the first format of a preset
    # is the one the split-K test takes)
    "gpt-oss-20b": (2880, 2880, 32, 4, "topk_softmax", "gpt_oss", ("mxfp4_mma", "mxfp4",
                                                                    "dense")),
    "qwen3-30b-a3b": (2048, 768, 128, 8, "softmax_topk", "silu", ("fp8", "dense")),
}


def _weights(fmt, experts, n, k, gen, bias):
    w = random_weights(fmt, experts, n, k, torch.bfloat16, gen, bias=bias, fp8_block=(128, 128))
    move = lambda t: None if t is None else t.to(CUDA)
    return moe_ops.ExpertWeights(w.format, move(w.weight), move(w.scales), move(w.bias),
                                 w.block_n, w.block_k, w.layout)


def _layer(x, logits, w13, w2, top_k, routing, activation, lora_form=False, plan=None):
    """The model's sequence of ops (models/moe.py Experts.forward); `plan`: the GEMM form."""
    r = moe_ops.route(logits, top_k, routing, True, plan=plan)
    if lora_form:  # h13, then the activation: where a LoRA delta would go in between
        h13 = moe_ops.expert_gemm(x, r, w13, input_pairs_per_row=top_k)
        h = moe_ops.activation(h13, activation)
    else:
        h = moe_ops.expert_gemm(x, r, w13, input_pairs_per_row=top_k, activation=activation)
    y = moe_ops.expert_gemm(h, r, w2, input_pairs_per_row=1,
                            topk_weights=r.topk_weights.view(-1))
    return moe_ops.moe_sum(y, top_k), r, h


def _plan(form: str, tokens: int, top_k: int, experts: int, fmt: str):
    if form == "plan":
        return moe_ops.plan_expert_gemm(tokens * top_k, experts, fmt)
    return moe_ops.GemmPlan.parse(form)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tokens", [1, 16, 64, 512])
def test_gpu_layer_at_real_shapes(preset, tokens):
    hidden, inter, experts, top_k, routing, activation, formats = PRESETS[preset]
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).to(CUDA)
    logits = torch.randn(tokens, experts, generator=gen).to(CUDA)
    bias = preset == "gpt-oss-20b"
    for fmt, form in ((fmt, form) for fmt in formats for form in ("plan", "tensor_core:32")):
        if form == "plan":  # new weights per format, shared by its forms
            w13 = _weights(fmt, experts, 2 * inter, hidden, gen, bias)
            w2 = _weights(fmt, experts, hidden, inter, gen, bias)
        plan = _plan(form, tokens, top_k, experts, w13.format)
        out, r, h = _layer(x, logits, w13, w2, top_k, routing, activation, plan=plan)
        # the reference takes the GPU's routing (checked against the CPU op elsewhere) and the
        # GPU's h, so that each GEMM is judged on its own inputs
        want_h = gemm_reference(x, top_k, r.topk_ids, w13, activation)
        what = f"{preset} {fmt} {plan}, {tokens} tokens"
        assert_close(h, want_h, f"{what}: w13")
        want_y = gemm_reference(h, 1, r.topk_ids, w2, topk_weights=r.topk_weights)
        want = want_y.view(tokens, top_k, -1).sum(1)
        assert_close(out, want, f"{what}: layer")
        unfused, _, _ = _layer(x, logits, w13, w2, top_k, routing, activation, lora_form=True,
                               plan=plan)
        assert_close(unfused, want, f"{what}: unfused layer")


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("form", ["tensor_core:8:s2", "tensor_core:16:s4", "tensor_core:8:s"])
def test_gpu_layer_split_k_at_real_shapes(preset, tokens, form):
    # split-K in both GEMMs of a layer at the presets' K (gpt-oss-20b MXFP4: 23 k-steps, so
    # four splits of 6, 6, 6, 5)
    hidden, inter, experts, top_k, routing, activation, formats = PRESETS[preset]
    gen = torch.Generator().manual_seed(tokens + 100)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).to(CUDA)
    logits = torch.randn(tokens, experts, generator=gen).to(CUDA)
    bias = preset == "gpt-oss-20b"
    fmt = formats[0]
    w13 = _weights(fmt, experts, 2 * inter, hidden, gen, bias)
    w2 = _weights(fmt, experts, hidden, inter, gen, bias)
    plan = moe_ops.GemmPlan.parse(form)
    out, r, h = _layer(x, logits, w13, w2, top_k, routing, activation, plan=plan)
    what = f"{preset} {fmt} {plan}, {tokens} tokens"
    assert_close(h, gemm_reference(x, top_k, r.topk_ids, w13, activation), f"{what}: w13")
    want_y = gemm_reference(h, 1, r.topk_ids, w2, topk_weights=r.topk_weights)
    assert_close(out, want_y.view(tokens, top_k, -1).sum(1), f"{what}: layer")
    whole, _, _ = _layer(x, logits, w13, w2, top_k, routing, activation,
                         plan=moe_ops.GemmPlan("tensor_core", plan.block_m))
    assert_close(out, whole.double(), f"{what}: against the whole-K kernel")


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4_mma", "dense", "fp8"])
@pytest.mark.parametrize("tokens", [1, 64, 300])
@pytest.mark.parametrize("form", ["stream:8", "stream:16", "tensor_core:32", "tensor_core:8:s3",
                                  "tensor_core:8:s"])
def test_gpu_layer_replays_from_a_cuda_graph(fmt, tokens, form):
    hidden, inter, experts, top_k = 512, 256, 32, 4
    gen = torch.Generator().manual_seed(5)
    w13 = _weights(fmt, experts, 2 * inter, hidden, gen, True)
    w2 = _weights(fmt, experts, hidden, inter, gen, True)
    x = torch.zeros(tokens, hidden, dtype=torch.bfloat16, device=CUDA)
    logits = torch.zeros(tokens, experts, device=CUDA)
    args = (w13, w2, top_k, "topk_softmax", "gpt_oss", False, moe_ops.GemmPlan.parse(form))
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
        assert torch.equal(captured, eager), f"{fmt} {form}: replay differs from the eager layer"


@pytest.mark.parametrize("expert_weights", ["mxfp4", "fp8", "dense"])
def test_gpu_model_with_quantized_experts_matches_cpu_float32(expert_weights):
    # The same synthetic weights: bf16 on the GPU (the planned kernels) against float32 on the
    # CPU (the reference ops). A router logit margin below bf16's resolution can send a token to
    # another expert on the GPU (tiny-moe's mxfp4 prompt has one at layer 1: ~6% of the logits
    # from that one token), so the reference follows the GPU's routing and every difference in
    # routing must be such a near-tie; what is left is the kernels' own error.
    free, forced, ref, test = moe_parity.run("tiny-moe", expert_weights, 2, 37, "cuda",
                                             torch.bfloat16)
    assert not moe_parity.near_ties_only(ref, test), moe_parity.format_rows(free)
    error = forced[-1].relative_error
    assert error < 2e-2, (f"{expert_weights}: relative error {error:.4f} of bf16 GPU vs fp32 "
                          f"CPU on the same routing\n" + moe_parity.format_rows(forced))


def test_gpu_activation_reference_agrees_at_the_clamp():
    h13 = torch.tensor([[-8.0, 6.9, 7.0, 7.1, 100.0, -100.0, 7.1, -7.2]], device=CUDA)
    out = moe_ops.activation(h13, "gpt_oss")
    assert_close(out, activation_reference(h13, "gpt_oss"))


def test_gpu_bench_moe_runs(capsys):
    from moelora.bench import moe as bench_moe

    bench_moe.main(["--presets", "qwen3-30b-a3b", "--tokens", "1", "64", "--iters", "2",
                    "--settle-s", "0", "--weights", "fp8", "--variants", "tiles", "plan",
                    "--table"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 4 and "tiles" in out.splitlines()[-4]
    import json

    record = json.loads(lines[3])
    assert record["weights"] == "fp8" and record["variant"] == "plan"
    assert record["layer_us"] > 0 and record["roofline_us"] > 0
    assert record["plan"] == str(moe_ops.plan_expert_gemm(64 * 8, 128, "fp8"))
