"""Mixtral: softmax router, top-k renormalised, SiLU experts (w1 = gate, w3 = up, w2 = down)."""

from __future__ import annotations

from moelora.lora.sites import EXPERT_DOWN, EXPERT_GATE, EXPERT_UP, PeftLayout
from moelora.models.base import CausalLM
from moelora.models.config import ModelConfig, common_of
from moelora.models.weights import WeightRule


def fused_expert_rules(prefix: str) -> list[WeightRule]:
    """HF's in-memory 3D layout: gate_up_proj [E, 2I, H] as [gate | up], down_proj [E, H, I]."""
    return [
        WeightRule(f"{prefix}.experts.gate_up_proj", "model.layers.{layer}.mlp.experts.w13"),
        WeightRule(f"{prefix}.experts.down_proj", "model.layers.{layer}.mlp.experts.w2"),
    ]


class MixtralForCausalLM(CausalLM):
    family = "mixtral"
    architectures = ("MixtralForCausalLM",)
    # transformers 4 saved one linear per expert under block_sparse_moe (w1 gate, w3 up, w2
    # down); transformers 5 keeps the experts as 3D gate_up_proj ([gate; up]) and down_proj.
    peft_layout = PeftLayout(
        expert_modules=("block_sparse_moe.experts", "mlp.experts"),
        per_expert_names={"w1": EXPERT_GATE, "w3": EXPERT_UP, "w2": EXPERT_DOWN},
        expert_params=("gate_up_proj", "down_proj"),
    )

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        return ModelConfig(
            **common_of(hf, cls.family),
            num_experts=int(hf["num_local_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["intermediate_size"]),
            norm_topk_prob=True,
        )

    @classmethod
    def checkpoint_rules(cls, config: ModelConfig) -> list[WeightRule]:
        old = "model.layers.{layer}.block_sparse_moe"
        new = "model.layers.{layer}.mlp"
        w13, w2 = new + ".experts.w13", new + ".experts.w2"
        return [
            *super().checkpoint_rules(config),
            WeightRule(old + ".experts.{expert}.w1.weight", w13, "gate"),
            WeightRule(old + ".experts.{expert}.w3.weight", w13, "up"),
            WeightRule(old + ".experts.{expert}.w2.weight", w2),
            WeightRule(old + ".gate.weight", new + ".gate.weight"),
            *fused_expert_rules(new),
        ]
