"""The byte counting behind every roofline and memory check (moelora.bench.weight_bytes):
expected bytes computed by hand on a tiny config, and the whole-model count checked against the
parameters of every synthetic preset built on the meta device (real shapes, no memory)."""

from __future__ import annotations

import pytest
import torch
from moelora.bench.weight_bytes import (
    BYTES_PER_WEIGHT,
    WeightLayout,
    adapter_bytes,
    copy_rate_for,
    decode_step_bytes,
    kv_read_bytes,
    model_weight_bytes,
    stored_layout,
)
from moelora.models import model_class
from moelora.models.synthetic import PRESETS, preset_hf_config

# A GPT-OSS-shaped model small enough to count by hand: hidden 8, 2 query heads and 1 KV head of
# 4, 4 experts of width 6 (top-2), vocabulary 16, 2 layers (layer 0 sliding window 3).
TINY_GPT_OSS = {
    "architectures": ["GptOssForCausalLM"], "vocab_size": 16, "hidden_size": 8,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
    "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 6,
    "sliding_window": 3, "attention_bias": True, "rms_norm_eps": 1e-5,
    "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 64,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}


def _config(hf: dict):
    return model_class(hf["architectures"][0]).config_from_hf(hf)


def _meta_model(config, dtype=torch.float32):
    """The model with real shapes and no memory (parameters in `dtype`, as synthetic.py builds
    them; norm weights and sinks keep their own dtype)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return model_class(config.architecture)(config)
    finally:
        torch.set_default_dtype(prev)


def _stored_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_formats_cost_what_they_store():
    assert BYTES_PER_WEIGHT["bf16"] == 2 and BYTES_PER_WEIGHT["fp32"] == 4
    # MXFP4: a block of 32 weights is 16 bytes of E2M1 codes and one E8M0 scale byte
    assert BYTES_PER_WEIGHT["mxfp4"] * 32 == 17 and BYTES_PER_WEIGHT["mxfp4"] * 8 == 4.25
    # FP8: one byte a weight and one float32 scale per 128 x 128 block
    assert BYTES_PER_WEIGHT["fp8"] * 128 * 128 == 128 * 128 + 4


def test_whole_model_bytes_by_hand_gpt_oss():
    config = _config(TINY_GPT_OSS)
    h, q, kv, e, i, v = 8, 8, 4, 4, 6, 16
    attention = (2 * h * 4            # input and post-attention norms, float32 in GPT-OSS
                 + h * (q + 2 * kv) * 2 + (q + 2 * kv) * 2  # QKV and its bias
                 + q * h * 2 + h * 2  # o_proj and its bias
                 + 2 * 4)             # sinks, float32, one per query head
    router = e * h * 2 + e * 2
    experts = e * (3 * h * i * 2 + (2 * i + h) * 2)  # w13 + w2, b13 + b2
    fixed = v * h * 2 + h * 4 + v * h * 2  # embeddings, final norm, LM head
    expected = fixed + 2 * (attention + router + experts)
    assert model_weight_bytes(config, WeightLayout.of("bf16", torch.bfloat16)) == expected
    assert _stored_bytes(_meta_model(config, torch.bfloat16)) == expected
    mxfp4_experts = e * (3 * h * i * 17 / 32 + (2 * i + h) * 2)
    assert model_weight_bytes(config, WeightLayout.of("mxfp4", torch.bfloat16)) == \
        fixed + 2 * (attention + router + mxfp4_experts)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_whole_model_bytes_match_every_preset_as_built(preset, dtype):
    config = _config(preset_hf_config(preset))
    model = _meta_model(config, dtype)
    assert model_weight_bytes(config, WeightLayout.of("bf16", dtype)) == _stored_bytes(model)


def test_decode_step_bytes_by_hand():
    """Two sequences with 5 cached tokens each, MXFP4 experts; layer 0 selected 3 experts, layer
    1 two; two adapters of rank 2 touched 4 and 3 (adapter, expert) pairs."""
    config = _config(TINY_GPT_OSS)
    layout = WeightLayout.of("mxfp4", torch.bfloat16)
    h, q, kv, e, i, v = 8, 8, 4, 4, 6, 16
    attention = 2 * h * 4 + h * (q + 2 * kv) * 2 + (q + 2 * kv) * 2 + q * h * 2 + h * 2 + 2 * 4
    router = e * h * 2 + e * 2
    one_expert = 3 * h * i * 17 / 32 + (2 * i + h) * 2
    weights = 2 * h * 2 + h * 4 + v * h * 2 + 2 * (attention + router)  # embedding rows too
    # K and V of 1 head of 4 in bf16 per token: sliding layer 0 reads 3 tokens, layer 1 all 5
    kv_bytes = 2 * (3 + 5) * (2 * 1 * 4 * 2)
    lora_attention = 2 * ((h + q) + 2 * (h + kv) + (q + h))  # rank 2: A and B of q, k, v, o
    lora_pair = 2 * (2 * h + 3 * i)  # A13 [r, H], B13 [r, 2I], A2 [r, I], B2 [r, H]
    lora = 2 * (2 * lora_attention * 2) + (4 + 3) * lora_pair * 2
    step = decode_step_bytes(config, layout, [5, 5], [3, 2], kv_elem_bytes=2, lora_rank=2,
                             adapters_per_layer=[2, 2], pairs_per_layer=[4, 3])
    assert step.weights == weights
    assert step.experts == (3 + 2) * one_expert
    assert step.kv == kv_bytes == kv_read_bytes(config, [5, 5], 2)
    assert step.lora == lora
    assert step.total == weights + 5 * one_expert + kv_bytes + lora
    assert step.roofline_ms(1e9) == pytest.approx(1e3 * step.total / 1e9)
    assert step.roofline_ms(None) is None
    with pytest.raises(ValueError, match="experts_per_layer has 1 entries for 2 layers"):
        decode_step_bytes(config, layout, [5], [3], kv_elem_bytes=2)


def test_adapter_file_bytes_match_the_issue_figures():
    """A rank-16 adapter on attention and every expert: ~370 MB for GPT-OSS-20B (issue 21)."""
    config = _config(preset_hf_config("gpt-oss-20b"))
    assert adapter_bytes(config, 16, 2) == pytest.approx(369.8e6, rel=1e-3)
    tiny = _config(TINY_GPT_OSS)
    per_layer = 4 * ((8 + 8) + 2 * (8 + 4) + (8 + 8)) * 2 + 4 * 4 * (2 * 8 + 3 * 6) * 2
    assert adapter_bytes(tiny, 4, 2) == 2 * per_layer


def test_copy_rates_by_card_name():
    assert copy_rate_for("NVIDIA H100 80GB HBM3") == 3.0e12
    assert copy_rate_for("NVIDIA H200") == 4.18e12
    assert copy_rate_for("NVIDIA A100-SXM4-80GB") is None
    assert copy_rate_for("cpu") is None


def test_stored_layout_reads_the_tensors():
    config = _config(TINY_GPT_OSS)
    model = _meta_model(config)
    assert stored_layout(model) == WeightLayout("fp32", "fp32", "fp32")
    for layer in model.model.layers:  # experts kept as MXFP4 codes: uint8 blocks
        layer.mlp.experts.w13 = torch.nn.Parameter(
            torch.empty(4, 12, 8 // 2, dtype=torch.uint8, device="meta"), requires_grad=False)
        layer.mlp.experts.w2 = torch.nn.Parameter(
            torch.empty(4, 8, 6 // 2, dtype=torch.uint8, device="meta"), requires_grad=False)
    assert stored_layout(model).experts == "mxfp4"
    assert stored_layout(model).name == "mxfp4"
    with pytest.raises(ValueError, match="weights must be one of"):
        WeightLayout.of("int4", torch.bfloat16)
