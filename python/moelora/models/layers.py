"""Shared dense building blocks: RMSNorm (with the fused residual add), attention with one QKV
GEMM and LoRA hooks, gated MLP.

Parameters are allocated uninitialised (torch.empty) on the current default device and dtype:
the loader or synthetic.py fills every one, so construction costs no random-number time.
Every adaptable linear asks the context for its LoRA delta before it runs and adds it to its
output, bias included (PEFT semantics: out = base(x) + delta); asked first, the delta's kernels
may run beside the projection (engine/paged_context.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelora.models.config import ModelConfig
from moelora.models.context import ForwardContext
from moelora.models.rope import RopeInputs
from moelora.models.weights import WeightRule
from moelora.ops import layer as layer_ops


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
    """HF RMSNorm over the last dimension, normalised in float32 (moelora.ops.layer). weight_fp32
    (GPT-OSS): weight kept and applied in float32 before the cast back; otherwise the cast comes
    first, as Llama does. Given `residual`, the residual add is fused in: residual += x (in place)
    and the norm of the sum is returned."""

    def __init__(self, dim: int, eps: float, weight_fp32: bool = False):
        super().__init__()
        self.eps, self.weight_fp32 = eps, weight_fp32
        self.weight = empty_param(dim, dtype=torch.float32 if weight_fp32 else None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            return layer_ops.add_rms_norm(x, residual, self.weight, self.eps)
        rows = x.reshape(-1, x.shape[-1])
        return layer_ops.rms_norm(rows, self.weight, self.eps).view(x.shape)


@dataclass
class ProjectionSlice:
    """The rows of one projection (q, k or v; gate or up) inside a fused weight: views, no
    copies, so in-place edits (merging a LoRA delta in a test) reach the fused weight."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def rows_of(cls, fused: Linear, start: int, size: int) -> ProjectionSlice:
        rows = slice(start, start + size)
        return cls(fused.weight[rows], None if fused.bias is None else fused.bias[rows])


class Attention(nn.Module):
    """One QKV GEMM (q_proj | k_proj | v_proj rows concatenated at load, weights.py), per-site
    LoRA into the views of its output, optional q/k norm and clipping, then ctx.attention, which
    applies rope (fused with the KV-cache write) and attends."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.qkv_proj = Linear(c.hidden_size, q_dim + 2 * kv_dim, c.qkv_bias)
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
        # float32 as the attention kernels take it (a checkpoint's bf16 sinks are exact in it),
        # so no cast runs per layer and step
        self.sinks = empty_param(c.num_heads, dtype=torch.float32) if c.attention_sinks else None
        self.scale = c.head_dim**-0.5

    @property
    def split_sizes(self) -> tuple[int, int, int]:
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return q_dim, kv_dim, kv_dim

    def _slice(self, index: int) -> ProjectionSlice:
        sizes = self.split_sizes
        return ProjectionSlice.rows_of(self.qkv_proj, sum(sizes[:index]), sizes[index])

    @property
    def q_proj(self) -> ProjectionSlice:
        return self._slice(0)

    @property
    def k_proj(self) -> ProjectionSlice:
        return self._slice(1)

    @property
    def v_proj(self) -> ProjectionSlice:
        return self._slice(2)

    def keep_heads(self, q_heads: range, kv_heads: range) -> None:
        """Keeps only these query and KV heads of the QKV projection (one tensor-parallel rank's
        share; the caller cuts o_proj and the sinks)."""
        d = self.head_dim
        q_dim, kv_dim, _ = self.split_sizes

        def rows(heads: range, offset: int) -> torch.Tensor:
            return torch.arange(offset + heads.start * d, offset + heads.stop * d)

        keep = torch.cat([rows(q_heads, 0), rows(kv_heads, q_dim), rows(kv_heads, q_dim + kv_dim)])
        keep = keep.to(self.qkv_proj.weight.device)
        proj = self.qkv_proj
        proj.weight = nn.Parameter(proj.weight[keep], requires_grad=False)  # a copy
        if proj.bias is not None:
            proj.bias = nn.Parameter(proj.bias[keep], requires_grad=False)
        proj.out_dim = keep.numel()
        self.num_heads, self.num_kv_heads = len(q_heads), len(kv_heads)

    def forward(self, x: torch.Tensor, rope: RopeInputs, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q_dim, kv_dim, _ = self.split_sizes
        lora = ctx.lora_delta([("q_proj", 0, q_dim), ("k_proj", q_dim, kv_dim),
                               ("v_proj", q_dim + kv_dim, kv_dim)], self.layer, x)
        qkv = self.qkv_proj(x)
        if lora is not None:
            lora.add_to(qkv)
        q, k, v = qkv.split(self.split_sizes, dim=-1)  # views into qkv
        if self.qk_norm == "full":  # OLMoE: norm over the whole projection, before clipping
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (u.clamp(-self.clip_qkv, self.clip_qkv) for u in (q, k, v))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":  # Qwen3: per-head norm, fused into the rotation
            rope = rope.with_qk_norm(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        o = ctx.attention(self.layer, q, k, v, rope=rope, scale=self.scale,
                          sliding_window=self.sliding_window, sinks=self.sinks)
        o = o.reshape(t, self.num_heads * self.head_dim)
        lora = ctx.lora_delta([("o_proj", 0, self.o_proj.out_dim)], self.layer, o)
        out = self.o_proj(o)
        if lora is not None:
            lora.add_to(out)
        return out


def qkv_rules(config: ModelConfig) -> list[WeightRule]:
    """Checkpoint q_proj / k_proj / v_proj weights (and biases) load into their rows of the fused
    self_attn.qkv_proj, in place."""
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return fused_row_rules("model.layers.{layer}.self_attn", "qkv_proj",
                           {"q_proj": q_dim, "k_proj": kv_dim, "v_proj": kv_dim}, config.qkv_bias)


def gate_up_rules(module: str, inter: int, bias: bool) -> list[WeightRule]:
    """Checkpoint gate_proj / up_proj weights (and biases) of the GatedMLP at `module` (a name
    template with {layer}) load into their rows of its fused gate_up_proj, in place."""
    return fused_row_rules(module, "gate_up_proj", {"gate_proj": inter, "up_proj": inter}, bias)


def fused_row_rules(module: str, fused: str, parts: dict[str, int], bias: bool
                    ) -> list[WeightRule]:
    """`module`.<part>.weight (and .bias) of each part, rows in order, into `module`.`fused`."""
    rules, start = [], 0
    for name, size in parts.items():
        for leaf in ("weight", "bias") if bias else ("weight",):
            rules.append(WeightRule(f"{module}.{name}.{leaf}", f"{module}.{fused}.{leaf}",
                                    rows=(start, start + size)))
        start += size
    return rules


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up as one GEMM: gate_up_proj holds [gate | up] rows
    (filled from the checkpoint's gate_proj and up_proj by gate_up_rules), and their LoRA sites
    share one launch. `site_prefix` names its LoRA sites ("" or "shared_expert.")."""

    def __init__(self, hidden: int, inter: int, layer: int, site_prefix: str = "",
                 bias: bool = False):
        super().__init__()
        self.layer, self.prefix, self.inter = layer, site_prefix, inter
        self.gate_up_proj = Linear(hidden, 2 * inter, bias)
        self.down_proj = Linear(inter, hidden, bias)

    @property
    def gate_proj(self) -> ProjectionSlice:
        return ProjectionSlice.rows_of(self.gate_up_proj, 0, self.inter)

    @property
    def up_proj(self) -> ProjectionSlice:
        return ProjectionSlice.rows_of(self.gate_up_proj, self.inter, self.inter)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        p, i = self.prefix, self.inter
        lora = ctx.lora_delta([(p + "gate_proj", 0, i), (p + "up_proj", i, i)], self.layer, x)
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            lora.add_to(gate_up)
        gate, up = gate_up.split(i, dim=-1)
        h = F.silu(gate) * up
        lora = ctx.lora_delta([(p + "down_proj", 0, self.down_proj.out_dim)], self.layer, h)
        out = self.down_proj(h)
        if lora is not None:
            lora.add_to(out)
        return out
