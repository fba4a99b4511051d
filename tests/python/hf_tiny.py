"""Tiny random HF checkpoints for every model family moelora serves.

Test helper shared by several test files (models, PEFT parsing, engine): `make_tiny(family, path)`
builds a transformers model from a small config with a fixed seed, saves it with save_pretrained
(sharded, so the loader's index path is exercised) and returns (hf_model, hf_config).

Weights use a larger init std than real models (0.15 instead of 0.02) so logits are peaked:
greedy decoding of a random model is then stable against float32 rounding differences.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "gpt_oss",
    "llama",
    "qwen2",
    "qwen3",
)

# Shared small shapes: hidden 64, 4 query heads of 16 over 2 KV heads (GQA), vocab 300.
_COMMON = {
    "vocab_size": 300,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.15,
    "tie_word_embeddings": False,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": None,
}


def _config(family: str):
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(
            **_COMMON, num_hidden_layers=2, intermediate_size=48,
            num_local_experts=4, num_experts_per_tok=2, rope_theta=10000.0,
        )
    if family == "qwen2_moe":
        # Layer 1 is a dense MLP (mlp_only_layers) to cover mixed dense/MoE stacks.
        return tf.Qwen2MoeConfig(
            **_COMMON, num_hidden_layers=3, intermediate_size=80, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1], qkv_bias=True,
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **_COMMON, num_hidden_layers=3, intermediate_size=80, moe_intermediate_size=32,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[2],
        )
    if family == "olmoe":
        return tf.OlmoeConfig(
            **{**_COMMON, "num_key_value_heads": 4}, num_hidden_layers=2, intermediate_size=32,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=0.8,
        )
    if family == "gpt_oss":
        # sliding_window 5 is shorter than every test sequence; layer 0 slides, layer 1 is full.
        return tf.GptOssConfig(
            **_COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=4,
            num_experts_per_tok=2, sliding_window=5, attention_bias=True,
            layer_types=["sliding_attention", "full_attention"], swiglu_limit=7.0,
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 16,
            },
        )
    if family == "llama":
        return tf.LlamaConfig(
            **{**_COMMON, "tie_word_embeddings": True}, num_hidden_layers=2, intermediate_size=96,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "qwen2":
        return tf.Qwen2Config(**_COMMON, num_hidden_layers=2, intermediate_size=96)
    if family == "qwen3":
        return tf.Qwen3Config(**_COMMON, num_hidden_layers=2, intermediate_size=96)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def make_tiny(family: str, path: str | Path, seed: int = 0):
    """Build a tiny random `family` model, save it sharded to `path`; returns (model, config)."""
    import transformers as tf

    config = _config(family)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(torch.float32).eval()
    if family == "gpt_oss":
        # HF initialises expert biases to zero; random ones exercise the loader's bias handling.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.experts.gate_up_proj_bias.normal_(0.0, 0.1)
                layer.mlp.experts.down_proj_bias.normal_(0.0, 0.1)
    model.save_pretrained(str(path), max_shard_size="100KB", safe_serialization=True)
    return model, config
