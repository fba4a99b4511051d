"""This rank's shard of a loaded model, of its LoRA sites and of every adapter plan.

Megatron-style tensor parallel over N ranks (rank r):
  column-parallel (output split): q/k/v by heads, gate/up (dense, shared expert, experts);
  row-parallel (input split): o, down; their partial outputs are summed by one all-reduce
  after the attention block and one after the MLP / MoE block (biases of row-parallel layers
  stay on rank 0 only, so the sum adds them once).
Expert parallel: rank r keeps experts [r*E/N, (r+1)*E/N) whole and computes their share of
every token (each rank has all tokens); the MoE block's all-reduce combines the shares.
Expert stacks stay as stored: dense, MXFP4 or block FP8. Expert parallel slices any of them
along the expert axis; tensor parallel slices the stored tensors along w13's output rows and
w2's input columns, so its cut must fall on block boundaries (MXFP4: 32 inputs per scale;
FP8: the scale blocks), which ParallelConfig.validate_model checks before anything is built.

LoRA follows the base weights: a column-parallel site keeps A whole and the rank's slice of B
(B^T views [r, out]: a column slice); a row-parallel site keeps B whole and the rank's slice of
A (A views [r, in]: a column slice); expert-parallel sites keep only the rank's experts. The
slices are MatrixSource view changes (offset, cols), so the native adapter cache of each rank
reads only its shard from the adapter files.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from moelora.distributed.config import ParallelConfig
from moelora.lora.plan import AdapterPlan
from moelora.lora.sites import EXPERT_DOWN, EXPERT_SITES, SHARED_EXPERT_PREFIX
from moelora.models.layers import Attention, GatedMLP
from moelora.models.moe import Experts, MoeBlock
from moelora.ops import moe as moe_ops

COLUMN, ROW, EXPERTS, REPLICATED = "column", "row", "experts", "replicated"
_COLUMN_SITES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def site_mode(parallel: ParallelConfig, site: str) -> str:
    """How `site`'s LoRA (and its base weight) is split: column, row, experts or replicated."""
    if site in EXPERT_SITES:
        if parallel.expert_parallel:
            return EXPERTS
        return ROW if site == EXPERT_DOWN else COLUMN
    leaf = site.removeprefix(SHARED_EXPERT_PREFIX)
    if leaf == site and not parallel.shard_attention:  # attention and dense MLP layers
        return REPLICATED
    return COLUMN if leaf in _COLUMN_SITES else ROW


def shard_sites(sites, parallel: ParallelConfig) -> list:
    """The rank-local LoraSiteSpecs (same type as given): dims or expert counts divided by N."""
    n = parallel.world_size
    out = []
    for site in sites:
        mode = site_mode(parallel, site.name)
        if mode == COLUMN:
            site = dataclasses.replace(site, out_dim=site.out_dim // n)
        elif mode == ROW:
            site = dataclasses.replace(site, in_dim=site.in_dim // n)
        elif mode == EXPERTS:
            site = dataclasses.replace(site, num_experts=site.num_experts // n)
        out.append(site)
    return out


def shard_plan(plan: AdapterPlan, full_sites, parallel: ParallelConfig, rank: int) -> AdapterPlan:
    """`plan` (validated against the whole model) cut to rank `rank`'s views."""
    n = parallel.world_size
    full = {s.name: s for s in full_sites}
    local = {s.name: s for s in shard_sites(full_sites, parallel)}
    sources = []
    for m in plan.sources:
        mode = site_mode(parallel, m.site)
        if mode == EXPERTS:  # the source's experts that are this rank's
            per_rank = full[m.site].num_experts // n
            first = max(m.expert, rank * per_rank)
            end = min(m.expert + m.experts, (rank + 1) * per_rank)
            if first >= end:
                continue  # another rank's experts
            m = dataclasses.replace(m, expert=first - rank * per_rank, experts=end - first,
                                    offset=m.offset + (first - m.expert) * m.expert_stride)
        elif (mode == COLUMN and m.is_b) or (mode == ROW and not m.is_b):
            cols = m.cols // n
            m = dataclasses.replace(m, offset=m.offset + rank * cols * m.col_stride, cols=cols)
        sources.append(m)
    return dataclasses.replace(plan, sources=sources,
                               sites={name: local[name] for name in plan.sites if name in local})


# ---- the model ----------------------------------------------------------------------------


def _param(t: torch.Tensor) -> nn.Parameter:
    # Always a copy: a contiguous slice would otherwise keep the whole tensor's storage alive
    # (on the GPU when a synthetic model is built there).
    return nn.Parameter(t.clone(memory_format=torch.contiguous_format), requires_grad=False)


def _zero_unless_first(t: torch.Tensor | None, rank: int):
    """A row-parallel bias: rank 0 adds it, the others add zero (the all-reduce sums once)."""
    return None if t is None else _param(t if rank == 0 else torch.zeros_like(t))


def _row(linear, start: int, size: int, rank: int) -> None:
    linear.weight = _param(linear.weight[:, start:start + size])
    linear.bias = _zero_unless_first(linear.bias, rank)
    linear.in_dim = size


class AllReduceOutput(nn.Module):
    """Runs `inner` and sums its (partial) output over all ranks, in place."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        out = self.inner(*args)
        dist.all_reduce(out)
        return out


class PartitionedExperts(Experts):
    """This rank's experts [expert_offset, expert_offset + num_experts) of an expert-parallel
    MoE layer, in whatever format they are stored.

    The MoE kernels run over the routing's blocks of this rank's experts only (moved to the
    front and numbered locally), so the output rows of other ranks' pairs are never written and
    stay zero. The LoRA kernels see those pairs as local expert 0 with zero activations and
    weight 0: they add nothing either, and the sum over ranks is exact.
    """

    expert_offset: int = 0

    def local_routing(self, routing: moe_ops.Routing) -> moe_ops.Routing:
        """`routing` restricted to this rank's experts, without a host sync."""
        first, count, block_m = self.expert_offset, self.num_experts, routing.block_m
        experts = routing.block_expert  # -1 past the routing's blocks
        mine = (experts >= first) & (experts < first + count)
        order = torch.argsort(mine.logical_not().to(torch.uint8), stable=True)
        pairs = routing.sorted_pairs[:experts.numel() * block_m].view(-1, block_m)
        return dataclasses.replace(
            routing, sorted_pairs=pairs.index_select(0, order).view(-1),
            block_expert=torch.where(mine, experts - first, -1).index_select(0, order),
            num_blocks=mine.sum(dtype=torch.int32).view(1),
            expert_counts=routing.expert_counts[first:first + count])

    def forward(self, x, routing: moe_ops.Routing, ctx, layer):
        local = self.local_routing(routing)
        w13, w2 = self.stacks()
        ids, k = routing.topk_ids, routing.top_k
        mine = (ids >= self.expert_offset) & (ids < self.expert_offset + self.num_experts)
        local_ids = torch.where(mine, ids - self.expert_offset, 0)
        weights = torch.where(mine, routing.topk_weights, 0.0)
        pairs = ids.numel()
        lora = ctx.moe_lora_w13_delta(layer, x, local_ids, self.inter)
        if lora is not None:
            h13 = moe_ops.expert_gemm(x, local, w13, input_pairs_per_row=k,
                                      out=x.new_zeros(pairs, 2 * self.inter))
            h = moe_ops.activation(h13, self.act, self.alpha, self.limit,
                                   addend=lora.joined()) * mine.view(-1, 1)
        else:
            h = moe_ops.expert_gemm(x, local, w13, input_pairs_per_row=k, activation=self.act,
                                    swiglu_alpha=self.alpha, swiglu_limit=self.limit,
                                    out=x.new_zeros(pairs, self.inter))
        lora = ctx.moe_lora_w2_delta(layer, h, local_ids, weights, x.shape[1])
        y = moe_ops.expert_gemm(h, local, w2, input_pairs_per_row=1,
                                topk_weights=weights.view(-1),
                                out=x.new_zeros(pairs, x.shape[1]))
        return moe_ops.moe_sum(y, k, addend=None if lora is None else lora.joined())


def _shard_attention(attn: Attention, rank: int, n: int) -> None:
    hq, hkv, d = attn.num_heads // n, attn.num_kv_heads // n, attn.head_dim
    attn.keep_heads(range(rank * hq, (rank + 1) * hq), range(rank * hkv, (rank + 1) * hkv))
    _row(attn.o_proj, rank * hq * d, hq * d, rank)
    if attn.sinks is not None:
        attn.sinks = _param(attn.sinks[rank * hq:(rank + 1) * hq])


def _shard_gated_mlp(mlp: GatedMLP, rank: int, n: int) -> None:
    """This rank's gate rows and up rows of gate_up_proj (kept [gate | up]), its down columns."""
    inter = mlp.inter // n
    fused = mlp.gate_up_proj
    gate = slice(rank * inter, (rank + 1) * inter)
    up = slice(mlp.inter + rank * inter, mlp.inter + (rank + 1) * inter)
    fused.weight = _param(torch.cat([fused.weight[gate], fused.weight[up]]))
    if fused.bias is not None:
        fused.bias = _param(torch.cat([fused.bias[gate], fused.bias[up]]))
    fused.out_dim = 2 * inter
    mlp.inter = inter
    _row(mlp.down_proj, rank * inter, inter, rank)


def _stored_parts(experts: Experts):
    """The tensors an expert stack is stored in, as (name, dim, elements per index along dim):
    w13's cut along its output rows (dim 1), w2's along its inputs (dim 2)."""
    if experts.format == "mxfp4":  # w2's dim 2 counts blocks of 32 inputs (16 bytes, 1 scale)
        return ([("w13_blocks", 1, 1), ("w13_scales", 1, 1)],
                [("w2_blocks", 2, 32), ("w2_scales", 2, 32)])
    if experts.format == "fp8":
        block_n, block_k = experts.fp8_block
        return ([("w13", 1, 1), ("w13_scale_inv", 1, block_n)],
                [("w2", 2, 1), ("w2_scale_inv", 2, block_k)])
    return [("w13", 1, 1)], [("w2", 2, 1)]


def _shard_experts(experts: Experts, rank: int, n: int) -> None:
    tiled = experts.mxfp4_layout == "mma_tiled"
    experts.unpack_tiles()  # the cuts below are of rows and blocks as stored untiled
    full, inter = experts.inter, experts.inter // n
    w13_parts, w2_parts = _stored_parts(experts)
    for name, dim, per in w13_parts:  # [gate | up] rows: this rank's gate rows and up rows
        value = getattr(experts, name)
        gate = value.narrow(dim, rank * inter // per, inter // per)
        up = value.narrow(dim, (full + rank * inter) // per, inter // per)
        setattr(experts, name, _param(torch.cat([gate, up], dim=dim)))
    for name, dim, per in w2_parts:
        value = getattr(experts, name)
        setattr(experts, name, _param(value.narrow(dim, rank * inter // per, inter // per)))
    if experts.b13 is not None:
        gate = slice(rank * inter, (rank + 1) * inter)
        up = slice(full + rank * inter, full + (rank + 1) * inter)
        experts.b13 = _param(torch.cat([experts.b13[:, gate], experts.b13[:, up]], dim=1))
    experts.b2 = _zero_unless_first(experts.b2, rank)
    experts.inter = inter
    if tiled:
        experts.pack_for_kernels()


def _partition_experts(experts: Experts, rank: int, n: int) -> None:
    per_rank = experts.num_experts // n
    for name, value in list(experts.named_parameters(recurse=False)):  # all [E, ...]
        setattr(experts, name, _param(value[rank * per_rank:(rank + 1) * per_rank]))
    experts.__class__ = PartitionedExperts
    experts.num_experts, experts.expert_offset = per_rank, rank * per_rank


def shard_layer(layer, parallel: ParallelConfig, rank: int) -> None:
    """Cuts one decoder layer to rank `rank`'s shard in place (wrapping the blocks whose
    partial outputs need an all-reduce)."""
    n = parallel.world_size
    if parallel.shard_attention:
        _shard_attention(layer.self_attn, rank, n)
        layer.self_attn = AllReduceOutput(layer.self_attn)
    mlp = layer.mlp
    if isinstance(mlp, MoeBlock):
        if parallel.expert_parallel:
            _partition_experts(mlp.experts, rank, n)
        else:
            _shard_experts(mlp.experts, rank, n)
        if mlp.shared_expert is not None:
            _shard_gated_mlp(mlp.shared_expert, rank, n)
        layer.mlp = AllReduceOutput(mlp)
    elif parallel.shard_attention:
        _shard_gated_mlp(mlp, rank, n)
        layer.mlp = AllReduceOutput(mlp)


def finish_shard(model, parallel: ParallelConfig, full_sites) -> None:
    """After every layer is cut: `model.config` describes the shard's attention and MLP widths
    (the KV pool sizes its pages from it) except num_experts, which the replicated router still
    needs whole, and `model.lora_sites()` returns the shard's sites."""
    n, mc = parallel.world_size, model.config
    if parallel.shard_attention:
        mc = dataclasses.replace(mc, num_heads=mc.num_heads // n,
                                 num_kv_heads=mc.num_kv_heads // n,
                                 intermediate_size=mc.intermediate_size // n)
    if not parallel.expert_parallel:
        mc = dataclasses.replace(mc, moe_intermediate_size=mc.moe_intermediate_size // n)
    mc = dataclasses.replace(mc, shared_expert_intermediate_size=(
        mc.shared_expert_intermediate_size // n))
    model.config = mc
    local_sites = shard_sites(full_sites, parallel)
    model.lora_sites = lambda: list(local_sites)  # instance override: the shard's sites


def shard_model(model, parallel: ParallelConfig, rank: int):
    """Cuts a loaded CausalLM to rank `rank`'s shard in place; returns (model, full sites)."""
    parallel.validate_model(model.config)
    full_sites = model.lora_sites()
    for layer in model.model.layers:
        shard_layer(layer, parallel, rank)
    finish_shard(model, parallel, full_sites)
    return model, full_sites


__all__ = ["AllReduceOutput", "PartitionedExperts", "finish_shard", "shard_layer", "shard_model",
           "shard_plan", "shard_sites", "site_mode"]
