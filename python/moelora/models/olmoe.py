"""OLMoE: q/k RMSNorm over the full projection width, optional clip_qkv, softmax router."""

from __future__ import annotations

from moelora.models.base import CausalLM
from moelora.models.config import ModelConfig, common_of
from moelora.models.qwen3_moe import QWEN_PEFT_LAYOUT, per_expert_rules
from moelora.models.weights import WeightRule


class OlmoeForCausalLM(CausalLM):
    family = "olmoe"
    architectures = ("OlmoeForCausalLM",)
    peft_layout = QWEN_PEFT_LAYOUT

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        clip = hf.get("clip_qkv")
        # OLMoE never uses a sliding window (HF builds a plain causal mask).
        common = {**common_of(hf, cls.family), "sliding_windows": ()}
        return ModelConfig(
            **common,
            num_experts=int(hf.get("num_experts") or hf["num_local_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["intermediate_size"]),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            qk_norm="full",
            clip_qkv=None if clip is None else float(clip),
        )

    @classmethod
    def checkpoint_rules(cls, config: ModelConfig) -> list[WeightRule]:
        return [*super().checkpoint_rules(config), *per_expert_rules()]
