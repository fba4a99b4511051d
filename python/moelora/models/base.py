"""CausalLM: the decoder stack every family shares, the LoRA site list it exposes and the PEFT
layout its adapters are saved in.

Families differ in config parsing, checkpoint layout and which MLP each layer has; the stack
(embed -> [norm, attention, residual, norm, mlp, residual] x L -> norm -> lm_head) is common.
The residual stream is carried through the layers and each residual add is fused into the norm
that follows it (the next layer's input norm, or the final norm), so a layer runs
[add + norm, attention, add + norm, mlp]. Parameter names follow HF's module names
(model.layers.N.mlp.gate.weight, ...) so most checkpoint tensors load by name; q/k/v_proj load
into one fused self_attn.qkv_proj, expert stacks are w13/w2 (see moe.py), by WeightRules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelora.lora.sites import (
    ATTENTION_SITES,
    DENSE_MLP_SITES,
    EXPERT_SITES,
    SHARED_EXPERT_SITES,
    LoraSiteSpec,
    PeftLayout,
)
from moelora.models.config import ModelConfig
from moelora.models.context import ForwardContext
from moelora.models.layers import (
    Attention,
    GatedMLP,
    RMSNorm,
    empty_param,
    gate_up_rules,
    qkv_rules,
)
from moelora.models.moe import Experts, MoeBlock
from moelora.models.rope import RopeInputs, RotaryEmbedding
from moelora.models.weights import WeightRule


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, mlp: nn.Module):
        super().__init__()
        fp32 = config.norm_weight_fp32
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fp32)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fp32)
        self.mlp = mlp

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RopeInputs,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: the previous layer's MLP output, not yet added to `residual` (the stream up
        to it, updated in place); for the first layer, the embeddings and residual None.
        Returns this layer's MLP output and the stream before it."""
        if residual is None:
            residual = hidden
            x = self.input_layernorm(hidden)
        else:
            x = self.input_layernorm(hidden, residual)
        x = self.self_attn(x, rope, ctx)
        x = self.post_attention_layernorm(x, residual)
        return self.mlp(x, ctx), residual


class _Backbone(nn.Module):
    """Holds `model.*` parameters under HF's names."""

    def __init__(self, config: ModelConfig, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size,
                                                             config.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weight_fp32)


class CausalLM(nn.Module):
    """Base of every family. Subclasses set `family`, `architectures` and implement
    `config_from_hf`; they may override `make_mlp` and `checkpoint_rules`, and MoE families
    declare how PEFT saves adapters of their experts (`peft_layout`)."""

    family: str = ""
    architectures: tuple[str, ...] = ()
    router_name: str = "gate"  # HF's name of the router module inside `mlp`
    # How PEFT names the adaptable modules (moelora.lora.sites): here the attention and dense
    # MLP projections, which every family names alike.
    peft_layout: PeftLayout = PeftLayout()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        layers = [DecoderLayer(config, i, self.make_mlp(config, i))
                  for i in range(config.num_layers)]
        self.model = _Backbone(config, layers)
        self.rotary = RotaryEmbedding(config)
        if not config.tie_word_embeddings:
            self.lm_head_weight = empty_param(config.vocab_size, config.hidden_size)

    # ---- family hooks ---------------------------------------------------------------------

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        raise NotImplementedError(f"{cls.__name__} must implement config_from_hf")

    def make_mlp(self, config: ModelConfig, layer: int) -> nn.Module:
        if config.moe_layers[layer]:
            return MoeBlock(config, layer, router_name=self.router_name)
        return GatedMLP(config.hidden_size, config.intermediate_size, layer,
                        bias=config.mlp_bias)

    @classmethod
    def checkpoint_rules(cls, config: ModelConfig) -> list[WeightRule]:
        """Checkpoint names that differ from parameter names (tensors named like a parameter
        load by name); see weights.py."""
        rules = [WeightRule("lm_head.weight", "lm_head_weight"), *qkv_rules(config)]
        mlp = "model.layers.{layer}.mlp"
        if not all(config.moe_layers):
            rules += gate_up_rules(mlp, config.intermediate_size, config.mlp_bias)
        if config.shared_expert_intermediate_size:
            rules += gate_up_rules(mlp + ".shared_expert", config.shared_expert_intermediate_size,
                                   False)
        return rules

    # ---- the contract ---------------------------------------------------------------------

    @property
    def lm_head_matrix(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head_weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """input_ids/positions [T] int64 -> final hidden states [T, H] (after the last norm)."""
        hidden = self.model.embed_tokens(input_ids)
        rope = self.rotary(positions)
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, rope, ctx)
        return self.model.norm(hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_matrix).float()

    def pack_for_kernels(self) -> CausalLM:
        """Once every weight is loaded: rewrites stored weights into the layouts the kernels
        read fastest (MXFP4 expert blocks: the mma layout in 16-row tiles, see
        Experts.pack_for_kernels).
        Every loader calls it; calling it again changes nothing."""
        for module in self.modules():
            if isinstance(module, Experts):
                module.pack_for_kernels()
        return self

    def lora_sites(self) -> list[LoraSiteSpec]:
        c = self.config
        n = c.num_layers
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q_name, k_name, v_name, o_name = ATTENTION_SITES
        sites = [
            LoraSiteSpec(q_name, n, 1, c.hidden_size, q_dim),
            LoraSiteSpec(k_name, n, 1, c.hidden_size, kv_dim),
            LoraSiteSpec(v_name, n, 1, c.hidden_size, kv_dim),
            LoraSiteSpec(o_name, n, 1, q_dim, c.hidden_size),
        ]
        dense = tuple(i for i in range(n) if not c.moe_layers[i])
        moe = tuple(i for i in range(n) if c.moe_layers[i])
        if dense:
            sites += _gated_sites(DENSE_MLP_SITES, n, 1, c.hidden_size, c.intermediate_size,
                                  dense)
        if moe and c.shared_expert_intermediate_size:
            sites += _gated_sites(SHARED_EXPERT_SITES, n, 1, c.hidden_size,
                                  c.shared_expert_intermediate_size, moe)
        if moe:
            sites += _gated_sites(EXPERT_SITES, n, c.num_experts, c.hidden_size,
                                  c.moe_intermediate_size, moe)
        return sites


def _gated_sites(names, num_layers: int, num_experts: int, hidden: int, inter: int,
                 layers: tuple[int, ...]) -> list[LoraSiteSpec]:
    """The gate, up and down sites of a gated MLP (hidden -> inter -> hidden)."""
    gate, up, down = names
    return [LoraSiteSpec(gate, num_layers, num_experts, hidden, inter, layers),
            LoraSiteSpec(up, num_layers, num_experts, hidden, inter, layers),
            LoraSiteSpec(down, num_layers, num_experts, inter, hidden, layers)]
