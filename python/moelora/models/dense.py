"""Dense decoders: Llama (rope llama3 scaling, optional biases), Qwen2 (qkv bias),
Qwen3 (per-head q/k norm). Every layer is a gated MLP with sites gate/up/down_proj."""

from __future__ import annotations

from moelora.models.base import CausalLM
from moelora.models.config import ModelConfig, common_of


class LlamaForCausalLM(CausalLM):
    family = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM")

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(**common_of(hf, cls.family),
                           intermediate_size=int(hf["intermediate_size"]),
                           qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


class Qwen2ForCausalLM(CausalLM):
    family = "qwen2"
    architectures = ("Qwen2ForCausalLM",)

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        return ModelConfig(**common_of(hf, cls.family),
                           intermediate_size=int(hf["intermediate_size"]), qkv_bias=True)


class Qwen3ForCausalLM(CausalLM):
    family = "qwen3"
    architectures = ("Qwen3ForCausalLM",)

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(**common_of(hf, cls.family),
                           intermediate_size=int(hf["intermediate_size"]),
                           qkv_bias=bias, o_bias=bias, qk_norm="head")
