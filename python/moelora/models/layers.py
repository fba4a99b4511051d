"""Shared dense building blocks: RMSNorm, attention with LoRA hooks, gated MLP.

Parameters are allocated uninitialised (torch.empty) on the current default device and dtype:
the loader or synthetic.py fills every one, so construction costs no random-number time.
Every adaptable linear calls ctx.apply_lora on its output, bias included (PEFT semantics:
out = base(x) + delta).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelora.models.config import ModelConfig
from moelora.models.context import ForwardContext
from moelora.models.rope import apply_rotary


def empty_param(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b); W [out, in]. A plain module so weights stay uninitialised until loaded."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight = empty_param(out_dim, in_dim)
        self.bias = empty_param(out_dim) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """HF RMSNorm: normalise in float32. weight_fp32 (GPT-OSS): weight kept and applied in
    float32 before the cast back; otherwise the cast comes first, as Llama does."""

    def __init__(self, dim: int, eps: float, weight_fp32: bool = False):
        super().__init__()
        self.eps, self.weight_fp32 = eps, weight_fp32
        self.weight = empty_param(dim, dtype=torch.float32 if weight_fp32 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_fp32:
            return (self.weight * h).to(x.dtype)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """q/k/v/o projections, optional q/k norm and clipping, rope, then ctx.attention."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = Linear(c.hidden_size, q_dim, c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, kv_dim, c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, kv_dim, c.qkv_bias)
        self.o_proj = Linear(q_dim, c.hidden_size, c.o_bias)
        self.qk_norm = c.qk_norm
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim, c.rms_norm_eps)
        self.clip_qkv = c.clip_qkv
        self.sliding_window = c.sliding_windows[layer]
        self.sinks = empty_param(c.num_heads) if c.attention_sinks else None
        self.scale = c.head_dim**-0.5

    def _project(self, site: str, proj: Linear, x: torch.Tensor, ctx: ForwardContext):
        out = proj(x)
        ctx.apply_lora(site, self.layer, x, out)
        return out

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q = self._project("q_proj", self.q_proj, x, ctx)
        k = self._project("k_proj", self.k_proj, x, ctx)
        v = self._project("v_proj", self.v_proj, x, ctx)
        if self.qk_norm == "full":  # OLMoE: norm over the whole projection, before clipping
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (u.clamp(-self.clip_qkv, self.clip_qkv) for u in (q, k, v))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":  # Qwen3: per-head norm
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = ctx.attention(self.layer, q, k, v, scale=self.scale,
                          sliding_window=self.sliding_window, sinks=self.sinks)
        o = o.reshape(t, self.num_heads * self.head_dim)
        return self._project("o_proj", self.o_proj, o, ctx)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); `site_prefix` names its LoRA sites ("" or "shared_expert.")."""

    def __init__(self, hidden: int, inter: int, layer: int, site_prefix: str = "",
                 bias: bool = False):
        super().__init__()
        self.layer, self.prefix = layer, site_prefix
        self.gate_proj = Linear(hidden, inter, bias)
        self.up_proj = Linear(hidden, inter, bias)
        self.down_proj = Linear(inter, hidden, bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        gate = self.gate_proj(x)
        ctx.apply_lora(self.prefix + "gate_proj", self.layer, x, gate)
        up = self.up_proj(x)
        ctx.apply_lora(self.prefix + "up_proj", self.layer, x, up)
        h = F.silu(gate) * up
        out = self.down_proj(h)
        ctx.apply_lora(self.prefix + "down_proj", self.layer, h, out)
        return out
