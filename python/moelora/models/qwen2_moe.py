"""Qwen2-MoE: qkv bias, softmax router (norm_topk_prob), sigmoid-gated shared expert,
dense layers from decoder_sparse_step / mlp_only_layers."""

from __future__ import annotations

from moelora.models.base import CausalLM
from moelora.models.config import ModelConfig, common_of, sparse_layers_of
from moelora.models.qwen3_moe import QWEN_PEFT_LAYOUT, per_expert_rules
from moelora.models.weights import WeightRule


class Qwen2MoeForCausalLM(CausalLM):
    family = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    peft_layout = QWEN_PEFT_LAYOUT  # the shared expert's mlp.shared_expert.* are standard

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        num_layers = int(hf["num_hidden_layers"])
        return ModelConfig(
            **common_of(hf, cls.family),
            num_experts=int(hf.get("num_experts") or hf["num_local_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"]),
            shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
            intermediate_size=int(hf.get("intermediate_size") or 0),
            moe_layers=sparse_layers_of(hf, num_layers),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qkv_bias=bool(hf.get("qkv_bias", True)),
        )

    @classmethod
    def checkpoint_rules(cls, config: ModelConfig) -> list[WeightRule]:
        return [*super().checkpoint_rules(config), *per_expert_rules()]
