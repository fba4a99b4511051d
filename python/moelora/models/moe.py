"""MoE block: router, base experts over (token, k) pairs, and the expert LoRA hooks.

Data flow per layer (T tokens, top-k K, E experts, hidden H, expert width I), five native ops
(moelora.ops.moe; the same kernels' CPU references on the CPU):
  router_logits [T, E] -> route -> topk_ids / topk_weights [T, K] + pairs grouped by expert
  h13 [T*K, 2I] = x[pair token] @ w13[expert]^T (+ b13)
  h   [T*K, I]  = act(h13 + d13)     d13: ctx.moe_lora_w13_delta, added in the activation
  y   [T*K, H]  = w * (h @ w2[expert]^T (+ b2))
  out [T, H]    = sum over K of (y + d2)     d2: ctx.moe_lora_w2_delta (w * delta), in the sum
The deltas are asked for before the GEMM they belong to, so that their kernels may run beside it
(engine/paged_context.py).
Pair p = t * K + k throughout, the layout the native align kernel consumes. When the context has no
w13 delta (no token of the step has an adapter on the experts) the activation runs in w13's epilogue
and h13 never exists. Expert stacks stay as stored (ModelConfig.expert_format): dense in the model's
dtype, MXFP4 blocks + scales, or FP8 with block scales; the kernels dequantize in registers. MXFP4
blocks load as the checkpoint's bytes and CausalLM.pack_for_kernels then repacks them once into the
mma layout (ops.moe.mxfp4_to_mma_layout), which the tensor-core kernels decode with fewer
instructions, stored in 16-row tiles (ops.moe.mxfp4_to_tiled_layout) that they read as contiguous
memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moelora.models.config import EXPERT_FORMATS, ModelConfig
from moelora.models.context import ForwardContext
from moelora.models.layers import GatedMLP, Linear, empty_param
from moelora.ops import moe as moe_ops


class Router(nn.Module):
    """Top-k routing. softmax_topk (Mixtral/Qwen/OLMoE): softmax over all experts in float32,
    top-k, optional renormalisation. topk_softmax (GPT-OSS): top-k logits, softmax over them.
    The router GEMM is ops.moe.router_logits (one native launch at decode); everything after
    it is one native op (ops.moe.route), which also carries the step's expert GEMM plan
    (ops.moe.plan_expert_gemm) to the experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind, self.top_k, self.renorm = config.router, config.top_k, config.norm_topk_prob
        self.num_experts, self.expert_format = config.num_experts, config.expert_format
        self.weight = empty_param(config.num_experts, config.hidden_size)
        self.bias = empty_param(config.num_experts) if config.router_bias else None

    def route(self, x: torch.Tensor, block_m: int | None = None) -> moe_ops.Routing:
        logits = moe_ops.router_logits(x, self.weight, self.bias)
        plan = moe_ops.plan_expert_gemm(x.shape[0] * self.top_k, self.num_experts,
                                        self.expert_format)
        return moe_ops.route(logits, self.top_k, self.kind, self.renorm, block_m, plan)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights float32 [T, K], topk_ids int32 [T, K])."""
        routing = self.route(x)
        return routing.topk_weights, routing.topk_ids


def _check_format(c: ModelConfig) -> None:
    if c.expert_format not in EXPERT_FORMATS:
        raise ValueError(f"{c.architecture}: expert_format {c.expert_format!r} not in "
                         f"{EXPERT_FORMATS}")
    h, i = c.hidden_size, c.moe_intermediate_size
    if c.expert_format == "mxfp4" and (h % 32 or i % 32):
        raise ValueError(f"{c.architecture}: MXFP4 experts need hidden ({h}) and expert width "
                         f"({i}) to be multiples of 32")
    if c.expert_format == "fp8":
        block_n, block_k = c.expert_fp8_block
        if block_n <= 0 or block_k <= 0 or i % block_n:
            raise ValueError(f"{c.architecture}: FP8 expert blocks {c.expert_fp8_block} must be "
                             f"positive with the expert width {i} a multiple of the row block "
                             f"(gate and up rows stack into one scale grid)")


class Experts(nn.Module):
    """Stacked expert weights: w13 [E, 2I, H] (rows [gate | up]), w2 [E, H, I], optional biases,
    stored as config.expert_format says:
      dense  w13 / w2 in the model's dtype;
      mxfp4  w13_blocks uint8 [E, 2I, H/32, 16] + w13_scales uint8 [E, 2I, H/32], likewise w2,
             the blocks' words in `mxfp4_layout` ("checkpoint" as loaded, "mma_tiled" once
             packed: 16-row tiles [E, 2I/16, ceil(H/128), 16, 64] + [.., 16, 4]);
      fp8    w13 / w2 float8_e4m3fn + w13_scale_inv / w2_scale_inv float32 block scales."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        _check_format(c)
        e, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.num_experts, self.inter, self.format = e, i, c.expert_format
        self.act, self.alpha, self.limit = c.expert_act, c.swiglu_alpha, c.swiglu_limit
        if self.format == "dense":
            self.w13 = empty_param(e, 2 * i, h)
            self.w2 = empty_param(e, h, i)
        elif self.format == "mxfp4":
            self.w13_blocks = empty_param(e, 2 * i, h // 32, 16, dtype=torch.uint8)
            self.w13_scales = empty_param(e, 2 * i, h // 32, dtype=torch.uint8)
            self.w2_blocks = empty_param(e, h, i // 32, 16, dtype=torch.uint8)
            self.w2_scales = empty_param(e, h, i // 32, dtype=torch.uint8)
        else:
            self.fp8_block = c.expert_fp8_block
            bn, bk = self.fp8_block
            self.w13 = empty_param(e, 2 * i, h, dtype=torch.float8_e4m3fn)
            self.w13_scale_inv = empty_param(e, 2 * i // bn, math.ceil(h / bk),
                                             dtype=torch.float32)
            self.w2 = empty_param(e, h, i, dtype=torch.float8_e4m3fn)
            self.w2_scale_inv = empty_param(e, math.ceil(h / bn), math.ceil(i / bk),
                                            dtype=torch.float32)
        self.b13 = empty_param(e, 2 * i) if c.expert_bias else None
        self.b2 = empty_param(e, h) if c.expert_bias else None
        self.mxfp4_layout = "checkpoint"
        self.hidden = h  # w13's K (tiles pad their k-steps; w2's K is self.inter)

    @torch.no_grad()
    def pack_for_kernels(self) -> None:
        """MXFP4 blocks, holding the checkpoint's bytes, repacked into the mma layout (in
        place), then into its 16-row tiles (mma_tiled: a warp of the expert GEMM reads a k-step
        of its rows as one contiguous KB) where both stacks hold whole tiles; once, after
        loading (again: nothing). Sharding cuts the mma layout: unpack_tiles first."""
        if self.format != "mxfp4" or self.mxfp4_layout == "mma_tiled":
            return
        if self.mxfp4_layout == "checkpoint":
            for blocks in (self.w13_blocks, self.w2_blocks):
                moe_ops.mxfp4_to_mma_layout(blocks.data, out=blocks.data)
            self.mxfp4_layout = "mma"
        if self.w13_blocks.shape[1] % moe_ops.MXFP4_TILE_ROWS or \
                self.w2_blocks.shape[1] % moe_ops.MXFP4_TILE_ROWS:
            return
        for name in ("w13", "w2"):
            tiles, scales = moe_ops.mxfp4_to_tiled_layout(getattr(self, name + "_blocks").data,
                                                          getattr(self, name + "_scales").data)
            setattr(self, name + "_blocks", nn.Parameter(tiles, requires_grad=False))
            setattr(self, name + "_scales", nn.Parameter(scales, requires_grad=False))
        self.mxfp4_layout = "mma_tiled"

    @torch.no_grad()
    def unpack_tiles(self) -> None:
        """Tiled MXFP4 stacks back to the mma layout [E, N, K/32, 16] (what a shard cuts);
        pack_for_kernels tiles them again."""
        if self.mxfp4_layout != "mma_tiled":
            return
        for name, width in (("w13", self.hidden), ("w2", self.inter)):
            blocks, scales = moe_ops.mxfp4_from_tiled_layout(
                getattr(self, name + "_blocks").data, getattr(self, name + "_scales").data,
                width)
            setattr(self, name + "_blocks", nn.Parameter(blocks, requires_grad=False))
            setattr(self, name + "_scales", nn.Parameter(scales, requires_grad=False))
        self.mxfp4_layout = "mma"

    def stacks(self) -> tuple[moe_ops.ExpertWeights, moe_ops.ExpertWeights]:
        """(w13, w2) as the native ops take them."""
        if self.format == "dense":
            return (moe_ops.ExpertWeights("dense", self.w13, bias=self.b13),
                    moe_ops.ExpertWeights("dense", self.w2, bias=self.b2))
        if self.format == "mxfp4":
            layout = self.mxfp4_layout
            k13, k2 = (self.hidden, self.inter) if layout == "mma_tiled" else (0, 0)
            return (moe_ops.ExpertWeights("mxfp4", self.w13_blocks, self.w13_scales, self.b13,
                                          layout=layout, k=k13),
                    moe_ops.ExpertWeights("mxfp4", self.w2_blocks, self.w2_scales, self.b2,
                                          layout=layout, k=k2))
        bn, bk = self.fp8_block
        return (moe_ops.ExpertWeights("fp8", self.w13, self.w13_scale_inv, self.b13, bn, bk),
                moe_ops.ExpertWeights("fp8", self.w2, self.w2_scale_inv, self.b2, bn, bk))

    def forward(self, x: torch.Tensor, routing: moe_ops.Routing, ctx: ForwardContext,
                layer: int) -> torch.Tensor:
        w13, w2 = self.stacks()
        k = routing.top_k
        act = {"activation": self.act, "swiglu_alpha": self.alpha, "swiglu_limit": self.limit}
        lora = ctx.moe_lora_w13_delta(layer, x, routing.topk_ids, self.inter)
        if lora is not None:  # the LoRA delta goes into h13 before the activation
            h13 = moe_ops.expert_gemm(x, routing, w13, input_pairs_per_row=k)
            h = moe_ops.activation(h13, self.act, self.alpha, self.limit, addend=lora.joined())
        else:
            h = moe_ops.expert_gemm(x, routing, w13, input_pairs_per_row=k, **act)
        lora = ctx.moe_lora_w2_delta(layer, h, routing.topk_ids, routing.topk_weights,
                                     x.shape[1])
        y = moe_ops.expert_gemm(h, routing, w2, input_pairs_per_row=1,
                                topk_weights=routing.topk_weights.view(-1))
        return moe_ops.moe_sum(y, k, addend=None if lora is None else lora.joined())


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
        routing = getattr(self, self.router_name).route(x)
        out = self.experts(x, routing, ctx, self.layer)
        if self.shared_expert is not None:
            shared = self.shared_expert(x, ctx)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out
