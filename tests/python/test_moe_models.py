"""Models whose experts stay quantized (MXFP4 GPT-OSS, block-FP8 Qwen3-MoE and Mixtral) against
transformers in float32 on the same weights dequantized, and synthetic presets' expert formats.

Each quantized checkpoint is made in-process from a tiny random model (hf_tiny.py); the
reference checkpoint holds exactly the dequantized weights, which transformers runs. moelora
loads the quantized one with its experts as stored; prompt logits, batched greedy tokens and a
LoRA step (the unfused w13 path) must agree.
"""

from __future__ import annotations

import pytest
import torch
from moelora.models import ReferenceContext, load_model
from moelora.models.synthetic import build_synthetic
from test_models_vs_hf import NEW_TOKENS, PROMPTS, greedy
from test_quantized_checkpoints import _quantize, _tiny_checkpoint, _write_checkpoint
from transformers import AutoModelForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

BLOCK = 16  # FP8 scale block of the tiny checkpoints (their expert widths are multiples of it)


def _fp8(w: torch.Tensor):
    """[rows, cols] -> (float8_e4m3fn, float32 scales per BLOCK x BLOCK tile, dequantized)."""
    rows, cols = w.shape
    tiles = w.float().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
    scales = (tiles.abs().amax((1, 3)) / 448.0).clamp_min(1e-12)
    q = (tiles / scales[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    deq = (q.float().reshape(tiles.shape) * scales[:, None, :, None]).reshape(rows, cols)
    return q, scales, deq


def _quantized_pair(family: str, root):
    """(quantized dir, reference dir, expected expert_format) of a tiny `family` model."""
    config, tensors = _tiny_checkpoint(family, root / "original")
    quantized, reference = {}, {}
    for name, value in tensors.items():
        if family == "gpt_oss" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = _quantize(value)
            quantized[name + "_blocks"], quantized[name + "_scales"] = blocks, scales
            reference[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        elif (family != "gpt_oss" and value.dim() == 2 and name.endswith(".weight")
              and ("experts." in name or "self_attn.q_proj" in name)):
            q, s, deq = _fp8(value)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            reference[name] = deq
        else:
            quantized[name] = reference[name] = value
    method = {"quant_method": "mxfp4"} if family == "gpt_oss" else {
        "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
    _write_checkpoint(root / "quantized", {**config, "quantization_config": method}, quantized)
    _write_checkpoint(root / "reference", config, reference)
    return (root / "quantized", root / "reference",
            "mxfp4" if family == "gpt_oss" else "fp8")


@pytest.fixture(scope="module", params=["gpt_oss", "qwen3_moe", "mixtral"])
def pair(request, tmp_path_factory):
    quantized, reference, fmt = _quantized_pair(request.param,
                                                tmp_path_factory.mktemp(request.param))
    model = load_model(quantized, dtype=torch.float32, progress=False)
    assert model.config.expert_format == fmt
    return request.param, model, quantized, reference


@torch.inference_mode()
def test_quantized_experts_match_transformers(pair):
    family, model, _, reference = pair
    hf = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    prompt = torch.tensor(PROMPTS[0])
    ctx = ReferenceContext()
    ctx.begin_step(torch.zeros_like(prompt), torch.arange(len(prompt)))
    ours = model.compute_logits(model(prompt, torch.arange(len(prompt)), ctx))
    ref = hf(prompt[None]).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                               msg=lambda m: f"{family}: {m}")
    for p, got in zip(PROMPTS, greedy(model, PROMPTS, NEW_TOKENS)):
        ids = torch.tensor([p])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert got == want[0, len(p):].tolist(), f"{family}: prompt {p}"


@torch.inference_mode()
def test_lora_on_quantized_experts_equals_dense(pair):
    """The unfused path (h13, LoRA delta, activation) on stored experts equals the same step on
    the dequantized model loaded dense."""
    family, model, _, reference = pair
    dense = load_model(reference, dtype=torch.float32, progress=False)
    assert dense.config.expert_format == "dense"
    gen = torch.Generator().manual_seed(3)
    sites = {s.name: s for s in model.lora_sites()}
    layer = sites["experts.gate"].layers[0]

    def lora(site, rank):
        s = sites[site]
        return (torch.randn(s.num_experts, rank, s.in_dim, generator=gen) * 0.2,
                torch.randn(s.num_experts, s.out_dim, rank, generator=gen) * 0.2)

    adapters = {0: {"experts.gate": {layer: lora("experts.gate", 4)},
                    "experts.up": {layer: lora("experts.up", 4)},
                    "experts.down": {layer: lora("experts.down", 2)}}}
    ids = torch.tensor([t for p in PROMPTS for t in p])
    seq_ids = torch.tensor([i for i, p in enumerate(PROMPTS) for _ in p])
    positions = torch.tensor([j for p in PROMPTS for j in range(len(p))])
    slots = torch.tensor([(0, -1, 0)[i] for i in seq_ids.tolist()], dtype=torch.int32)
    logits = []
    for m in (model, dense):
        ctx = ReferenceContext(adapters)
        ctx.begin_step(seq_ids, positions, slots)
        logits.append(m.compute_logits(m(ids, positions, ctx)))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{family}: {m}")


@pytest.mark.parametrize("expert_weights", [None, "dense", "mxfp4", "fp8"])
def test_synthetic_expert_formats(expert_weights):
    model = build_synthetic("tiny-moe", dtype=torch.float32, num_layers=1,
                            expert_weights=expert_weights)
    experts = model.model.layers[0].mlp.experts
    assert experts.format == (expert_weights or "dense")
    names = {n.rsplit(".", 1)[-1] for n, _ in experts.named_parameters()}
    assert names == {"dense": {"w13", "w2"}, "mxfp4": {"w13_blocks", "w13_scales", "w2_blocks",
                                                       "w2_scales"},
                     "fp8": {"w13", "w13_scale_inv", "w2", "w2_scale_inv"}}[experts.format]
    ids = torch.tensor([3, 1, 4, 1, 5])
    ctx = ReferenceContext()
    ctx.begin_step(torch.zeros_like(ids), torch.arange(5))
    hidden = model(ids, torch.arange(5), ctx)
    assert torch.isfinite(hidden).all() and 0.5 < hidden.std().item() < 2.0


def test_synthetic_gpt_oss_defaults_to_mxfp4():
    from moelora.models.synthetic import default_expert_weights

    assert default_expert_weights("gpt-oss-20b") == "mxfp4"
    assert default_expert_weights("qwen3-30b-a3b") == "dense"
    with pytest.raises(ValueError, match="expert_weights must be one of"):
        build_synthetic("tiny-moe", num_layers=1, expert_weights="int4")
