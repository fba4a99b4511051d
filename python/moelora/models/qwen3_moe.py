"""Qwen3-MoE: per-head q/k RMSNorm, softmax router with norm_topk_prob, mlp_only_layers."""

from __future__ import annotations

from moelora.lora.sites import EXPERT_DOWN, EXPERT_GATE, EXPERT_UP, PeftLayout
from moelora.models.base import CausalLM
from moelora.models.config import ModelConfig, common_of, sparse_layers_of
from moelora.models.mixtral import fused_expert_rules
from moelora.models.weights import WeightRule


def per_expert_rules() -> list[WeightRule]:
    """Qwen/OLMoE per-expert layout: experts.N.{gate,up,down}_proj.weight."""
    p = "model.layers.{layer}.mlp.experts"
    return [
        WeightRule(p + ".{expert}.gate_proj.weight", p + ".w13", "gate"),
        WeightRule(p + ".{expert}.up_proj.weight", p + ".w13", "up"),
        WeightRule(p + ".{expert}.down_proj.weight", p + ".w2"),
        *fused_expert_rules("model.layers.{layer}.mlp"),
    ]


# Qwen2-MoE, Qwen3-MoE and OLMoE adapters: transformers 4 saved one linear per expert
# (mlp.experts.{e}.gate_proj / up_proj / down_proj), transformers 5 the 3D gate_up_proj
# ([gate; up]) and down_proj of mlp.experts.
QWEN_PEFT_LAYOUT = PeftLayout(
    expert_modules=("mlp.experts",),
    per_expert_names={"gate_proj": EXPERT_GATE, "up_proj": EXPERT_UP, "down_proj": EXPERT_DOWN},
    expert_params=("gate_up_proj", "down_proj"),
)


class Qwen3MoeForCausalLM(CausalLM):
    family = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    peft_layout = QWEN_PEFT_LAYOUT

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        num_layers = int(hf["num_hidden_layers"])
        return ModelConfig(
            **common_of(hf, cls.family),
            # config.json says num_experts; transformers 5's save_pretrained num_local_experts.
            num_experts=int(hf.get("num_experts") or hf["num_local_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"]),
            intermediate_size=int(hf.get("intermediate_size") or 0),
            moe_layers=sparse_layers_of(hf, num_layers),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            qk_norm="head",
        )

    @classmethod
    def checkpoint_rules(cls, config: ModelConfig) -> list[WeightRule]:
        return [*super().checkpoint_rules(config), *per_expert_rules()]
