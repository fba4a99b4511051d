"""MoE block: router, base experts over (token, k) pairs, and the expert LoRA hooks.

Data flow per layer (T tokens, top-k K, E experts, hidden H, expert width I):
  router logits [T, E] -> topk_ids / topk_weights [T, K]
  h13 [T*K, 2I] = x[pair token] @ w13[expert]^T (+ b13)      ctx.moe_lora_w13 adds LoRA here
  h   [T*K, I]  = act(h13)
  y   [T*K, H]  = w * (h @ w2[expert]^T (+ b2))               ctx.moe_lora_w2 adds w * delta here
  out [T, H]    = sum over K
Pair p = t * K + k throughout, the layout the native align kernel consumes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelora.models.config import ModelConfig
from moelora.models.context import ForwardContext
from moelora.models.layers import GatedMLP, Linear, empty_param


def _grouped_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # torch._grouped_mm is a CUDA (sm90+) kernel for bf16 with 16-byte aligned rows.
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and x.shape[1] % 8 == 0
            and weight.shape[1] % 8 == 0)


def expert_linear(x: torch.Tensor, expert_of_row: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """Row r of the result is x[r] @ weight[expert_of_row[r]]^T.

    x [N, in], expert_of_row [N] int, weight [E, out, in] -> [N, out]. Rows are sorted by
    expert so each expert's weight is read once: one grouped GEMM on CUDA, a loop elsewhere.
    """
    num_experts, out_dim = weight.shape[0], weight.shape[1]
    order = torch.argsort(expert_of_row, stable=True)
    # scatter_add, not bincount: bincount sizes its output from a device max (a host sync),
    # which a CUDA graph capture of the decode step cannot contain
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(
        0, expert_of_row.long(), torch.ones_like(expert_of_row, dtype=torch.int64))
    sorted_x = x[order]
    if _grouped_mm_usable(x, weight):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        sorted_out = torch._grouped_mm(sorted_x, weight.transpose(1, 2), offs=offsets)
    else:
        sorted_out = x.new_empty(x.shape[0], out_dim)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                sorted_out[start:start + count] = sorted_x[start:start + count] @ weight[expert].T
                start += count
    out = torch.empty_like(sorted_out)
    out[order] = sorted_out
    return out


class Router(nn.Module):
    """Top-k routing. softmax_topk (Mixtral/Qwen/OLMoE): softmax over all experts in float32,
    top-k, optional renormalisation. topk_softmax (GPT-OSS): top-k logits, softmax over them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind, self.top_k, self.renorm = config.router, config.top_k, config.norm_topk_prob
        self.weight = empty_param(config.num_experts, config.hidden_size)
        self.bias = empty_param(config.num_experts) if config.router_bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight, self.bias)
        if self.kind == "topk_softmax":
            top_logits, topk_ids = torch.topk(logits, self.top_k, dim=-1)
            return torch.softmax(top_logits, dim=-1), topk_ids
        probs = torch.softmax(logits.float(), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renorm:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_weights.to(x.dtype), topk_ids


class Experts(nn.Module):
    """Stacked expert weights: w13 [E, 2I, H] (rows [gate | up]), w2 [E, H, I], optional biases."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        e, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.num_experts, self.inter = e, i
        self.act, self.alpha, self.limit = c.expert_act, c.swiglu_alpha, c.swiglu_limit
        self.w13 = empty_param(e, 2 * i, h)
        self.w2 = empty_param(e, h, i)
        self.b13 = empty_param(e, 2 * i) if c.expert_bias else None
        self.b2 = empty_param(e, h) if c.expert_bias else None

    def activation(self, h13: torch.Tensor) -> torch.Tensor:
        gate, up = h13[:, : self.inter], h13[:, self.inter:]
        if self.act == "silu":
            return F.silu(gate) * up
        # GPT-OSS: clamp, glu = gate * sigmoid(alpha * gate), out = (up + 1) * glu
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                ctx: ForwardContext, layer: int) -> torch.Tensor:
        t, k = topk_ids.shape
        flat_ids = topk_ids.flatten()
        pair_token = torch.arange(t * k, device=x.device) // k
        h13 = expert_linear(x[pair_token], flat_ids, self.w13)
        if self.b13 is not None:
            h13 += self.b13[flat_ids]
        ctx.moe_lora_w13(layer, x, topk_ids, h13)
        h = self.activation(h13)
        y = expert_linear(h, flat_ids, self.w2)
        if self.b2 is not None:
            y += self.b2[flat_ids]
        y *= topk_weights.flatten()[:, None].to(y.dtype)
        ctx.moe_lora_w2(layer, h, topk_ids, topk_weights, y)
        return y.view(t, k, -1).sum(dim=1)


class MoeBlock(nn.Module):
    """Router + experts, plus Qwen2-MoE's sigmoid-gated shared expert when configured."""

    def __init__(self, config: ModelConfig, layer: int, router_name: str = "gate"):
        super().__init__()
        self.layer = layer
        self.router_name = router_name
        setattr(self, router_name, Router(config))  # HF names it `gate` or (GPT-OSS) `router`
        self.experts = Experts(config)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(config.hidden_size,
                                          config.shared_expert_intermediate_size, layer,
                                          site_prefix="shared_expert.")
            self.shared_expert_gate = Linear(config.hidden_size, 1)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        topk_weights, topk_ids = getattr(self, self.router_name)(x)
        out = self.experts(x, topk_ids, topk_weights, ctx, self.layer)
        if self.shared_expert is not None:
            shared = self.shared_expert(x, ctx)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out
