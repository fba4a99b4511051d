"""GPT-OSS: biased router (top-k logits, softmax over the selected), clamped swiglu experts with
biases, attention bias and sinks, sliding-window layers from layer_types, YaRN rope.

Checkpoints store experts fused as [E, in, out] with gate/up interleaved by column; the rules
below transpose and de-interleave them at load so w13 is [gate | up] like every other family.
MXFP4 checkpoints store them as [E, out, in / 32] blocks and scales: kept as stored
(expert_format "mxfp4"), their gate/up rows are de-interleaved by a row permutation.
"""

from __future__ import annotations

from moelora.lora.sites import PeftLayout
from moelora.models.base import CausalLM
from moelora.models.config import ModelConfig, common_of
from moelora.models.weights import (
    WeightRule,
    gpt_oss_gate_up,
    gpt_oss_gate_up_bias,
    gpt_oss_gate_up_rows,
    transpose_experts,
)


class GptOssForCausalLM(CausalLM):
    family = "gpt_oss"
    architectures = ("GptOssForCausalLM",)
    router_name = "router"
    # Only the transformers-5 3D layout exists: gate_up_proj (rows interleaved gate, up),
    # its bias, down_proj, its bias, registered in that order (the biases cannot be adapted).
    peft_layout = PeftLayout(
        expert_modules=("mlp.experts",),
        expert_params=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        gate_up_interleaved=True,
    )

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        method = (hf.get("quantization_config") or {}).get("quant_method")
        if "quantization_config" in hf and method != "mxfp4":
            raise ValueError(f"GPT-OSS checkpoint is quantized ({method or '?'}); moelora "
                             f"loads unquantized or MXFP4 GPT-OSS weights")
        bias = bool(hf.get("attention_bias", True))
        return ModelConfig(
            **common_of(hf, cls.family),
            num_experts=int(hf["num_local_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["intermediate_size"]),
            router="topk_softmax",
            router_bias=True,
            expert_act="gpt_oss",
            expert_bias=True,
            swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
            qkv_bias=bias,
            o_bias=bias,
            attention_sinks=True,
            norm_weight_fp32=True,
        )

    @classmethod
    def checkpoint_rules(cls, config: ModelConfig) -> list[WeightRule]:
        p = "model.layers.{layer}.mlp.experts"
        stored = []
        if config.expert_format == "mxfp4":
            stored = [
                WeightRule(p + ".gate_up_proj_blocks", p + ".w13_blocks",
                           transform=gpt_oss_gate_up_rows),
                WeightRule(p + ".gate_up_proj_scales", p + ".w13_scales",
                           transform=gpt_oss_gate_up_rows),
                WeightRule(p + ".down_proj_blocks", p + ".w2_blocks"),
                WeightRule(p + ".down_proj_scales", p + ".w2_scales"),
            ]
        return [
            *super().checkpoint_rules(config),
            *stored,
            WeightRule(p + ".gate_up_proj", p + ".w13", transform=gpt_oss_gate_up),
            WeightRule(p + ".gate_up_proj_bias", p + ".b13", transform=gpt_oss_gate_up_bias),
            WeightRule(p + ".down_proj", p + ".w2", transform=transpose_experts),
            WeightRule(p + ".down_proj_bias", p + ".b2"),
        ]
