"""`synthetic:<preset>`: random weights at real models' shapes, for benchmarks and demos.

Configs are written here as the HF config.json fields they come from, and parsed by the same
family code as a real checkpoint, so a synthetic model is shaped exactly like the real one.
Weights are created directly on the target device and dtype: normal(0, 0.02), norm weights 1,
biases 0, so activations stay in a realistic range layer after layer. Expert stacks are stored
as the real checkpoint ships them unless `expert_weights` says otherwise: GPT-OSS in MXFP4
(random codes, E8M0 scales around 2^-7, i.e. weights of about the same spread), the others
dense; "fp8" gives e4m3 experts with 128 x 128 block scales.
"""

from __future__ import annotations

import dataclasses

import torch

from moelora.models.base import CausalLM
from moelora.models.config import ModelConfig

_GPT_OSS_LAYERS = 24

PRESETS: dict[str, dict] = {
    "tiny-moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 1024, "hidden_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "intermediate_size": 512, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "eos_token_id": 2, "bos_token_id": 1,
    },
    # GPT-OSS's architecture at test size: MXFP4 experts (widths multiples of 32), sinks, a
    # sliding layer and a full one, YaRN rope.
    "tiny-gpt-oss": {
        "architectures": ["GptOssForCausalLM"], "vocab_size": 1024, "hidden_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64,
        "sliding_window": 8, "attention_bias": True, "rms_norm_eps": 1e-5, "swiglu_limit": 7.0,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 256},
        "max_position_embeddings": 1024, "eos_token_id": 2, "pad_token_id": 0,
    },
    "gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"], "vocab_size": 201088, "hidden_size": 2880,
        "num_hidden_layers": _GPT_OSS_LAYERS, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "intermediate_size": 2880,
        "sliding_window": 128, "attention_bias": True, "rms_norm_eps": 1e-5, "swiglu_limit": 7.0,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                     for i in range(_GPT_OSS_LAYERS)],
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 4096},
        "max_position_embeddings": 131072, "eos_token_id": 200002, "pad_token_id": 199999,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "intermediate_size": 6144, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960, "eos_token_id": 151645, "bos_token_id": 151643,
    },
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 14336,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "eos_token_id": 2, "bos_token_id": 1,
    },
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"], "vocab_size": 50304, "hidden_size": 2048,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128,
        "num_experts": 64, "num_experts_per_tok": 8, "intermediate_size": 1024, "norm_topk_prob": False,
        "clip_qkv": None, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "eos_token_id": 50279,
    },
}


EXPERT_WEIGHTS = ("dense", "mxfp4", "fp8")
# E8M0 exponents of synthetic MXFP4 blocks: uniform random E2M1 codes have an RMS of ~2.9, so
# 2^-7 (127 - 7) gives weights of RMS ~0.023, like the dense init.
_MXFP4_SCALES = (119, 122)  # [low, high)
_FP8_SCALE = 0.02  # e4m3 codes of N(0, 1) times this: weights of spread 0.02


def default_expert_weights(preset: str) -> str:
    """How `preset`'s real checkpoint stores its experts: GPT-OSS in MXFP4, the others dense."""
    return "mxfp4" if "GptOss" in preset_hf_config(preset)["architectures"][0] else "dense"


def preset_hf_config(preset: str, num_layers: int | None = None) -> dict:
    """The HF-style config dict of `preset`, optionally cut to its first `num_layers` layers."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; presets: {sorted(PRESETS)}")
    hf = dict(PRESETS[preset])
    if num_layers is not None:
        full = hf["num_hidden_layers"]
        if not 0 < num_layers <= full:
            raise ValueError(f"synthetic:{preset}: num_layers must be in [1, {full}], "
                             f"got {num_layers}")
        hf["num_hidden_layers"] = num_layers
        if "layer_types" in hf:
            hf["layer_types"] = hf["layer_types"][:num_layers]
    return hf


@torch.no_grad()
def init_random_(model: CausalLM, std: float = 0.02, seed: int = 0) -> None:
    """Fill every parameter in place: norms 1, biases 0, everything else normal(0, std)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("_blocks"):  # MXFP4 codes: every byte equally likely
            param.copy_(torch.randint(0, 256, param.shape, generator=generator, device=device,
                                      dtype=torch.uint8))
        elif leaf.endswith("_scales"):  # MXFP4 E8M0 exponents
            param.copy_(torch.randint(*_MXFP4_SCALES, param.shape, generator=generator,
                                      device=device, dtype=torch.uint8))
        elif param.dtype == torch.float8_e4m3fn:
            param.copy_(torch.randn(param.shape, generator=generator, device=device)
                        .to(torch.float8_e4m3fn))
        elif leaf.endswith("_scale_inv"):  # block FP8 scales, 20% spread around _FP8_SCALE
            param.copy_(_FP8_SCALE * (0.8 + 0.4 * torch.rand(param.shape, generator=generator,
                                                              device=device)))
        elif name.endswith("norm.weight"):
            param.fill_(1.0)
        elif leaf in ("bias", "b13", "b2"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)


def preset_model_config(preset: str, num_layers: int | None = None,
                        expert_weights: str | None = None) -> ModelConfig:
    """The ModelConfig of synthetic:`preset` as build_synthetic makes it."""
    from moelora.models import model_class

    hf = preset_hf_config(preset, num_layers)
    config = model_class(hf["architectures"][0]).config_from_hf(hf)
    expert_weights = expert_weights or default_expert_weights(preset)
    if expert_weights not in EXPERT_WEIGHTS:
        raise ValueError(f"synthetic:{preset}: expert_weights must be one of {EXPERT_WEIGHTS}, "
                         f"got {expert_weights!r}")
    if config.is_moe:
        config = dataclasses.replace(config, expert_format=expert_weights)
    return config


def build_synthetic(preset: str, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu", num_layers: int | None = None,
                    seed: int = 0, expert_weights: str | None = None) -> CausalLM:
    """`expert_weights`: "dense", "mxfp4" or "fp8" (None: as the real checkpoint stores them,
    default_expert_weights)."""
    from moelora.models import model_class

    config = preset_model_config(preset, num_layers, expert_weights)
    cls = model_class(config.architecture)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(prev)
    init_random_(model, seed=seed)  # MXFP4 blocks as a checkpoint holds them
    return model.pack_for_kernels().eval()
