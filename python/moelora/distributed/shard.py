"""This rank's shard of a loaded model, of its LoRA sites and of every adapter plan.

Megatron-style tensor parallel over N ranks (rank r):
  column-parallel (output split): q/k/v by heads, gate/up (dense, shared expert, experts);
  row-parallel (input split): o, down; their partial outputs are summed by one all-reduce
  after the attention block and one after the MLP / MoE block (biases of row-parallel layers
  stay on rank 0 only, so the sum adds them once).
Expert parallel: rank r keeps experts [r*E/N, (r+1)*E/N) whole and computes their share of
every token (each rank has all tokens); the MoE block's all-reduce combines the shares.

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
from moelora.models.layers import Attention, GatedMLP
from moelora.models.moe import Experts, MoeBlock, expert_linear

COLUMN, ROW, EXPERTS, REPLICATED = "column", "row", "experts", "replicated"
_COLUMN_SITES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_SITES = ("o_proj", "down_proj")


def site_mode(parallel: ParallelConfig, site: str) -> str:
    """How `site`'s LoRA (and its base weight) is split: column, row, experts or replicated."""
    if site.startswith("experts."):
        if parallel.expert_parallel:
            return EXPERTS
        return ROW if site == "experts.down" else COLUMN
    leaf = site.removeprefix("shared_expert.")
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
        if mode == EXPERTS:
            per_rank = full[m.site].num_experts // n
            if m.expert // per_rank != rank:
                continue  # another rank's expert
            m = dataclasses.replace(m, expert=m.expert - rank * per_rank)
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


def _column(linear, start: int, size: int) -> None:
    linear.weight = _param(linear.weight[start:start + size])
    if linear.bias is not None:
        linear.bias = _param(linear.bias[start:start + size])
    linear.out_dim = size


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
    """This rank's experts [offset, offset + num_experts) of an expert-parallel MoE layer.

    Pairs routed to other ranks' experts contribute zero: they are left out of the base GEMMs
    and sent to local expert 0 with weight 0 and zeroed activations for the LoRA kernels
    (whose CPU align rejects out-of-range expert ids), so the sum over ranks is exact.
    """

    expert_offset: int = 0

    def forward(self, x, topk_ids, topk_weights, ctx, layer):
        t, k = topk_ids.shape
        local = (topk_ids >= self.expert_offset) & \
            (topk_ids < self.expert_offset + self.num_experts)
        local_ids = torch.where(local, topk_ids - self.expert_offset, 0)
        weights = torch.where(local, topk_weights, torch.zeros_like(topk_weights))
        flat_local = local.flatten()
        rows = flat_local.nonzero().flatten()
        ids = local_ids.flatten()[rows]
        pair_token = torch.arange(t * k, device=x.device) // k
        h13 = x.new_zeros(t * k, 2 * self.inter)
        if rows.numel():
            h13[rows] = expert_linear(x[pair_token[rows]], ids, self.w13)
            if self.b13 is not None:
                h13[rows] += self.b13[ids]
        ctx.moe_lora_w13(layer, x, local_ids, h13)
        h = torch.where(flat_local[:, None], self.activation(h13), torch.zeros_like(h13[:, :1]))
        y = x.new_zeros(t * k, x.shape[1])
        if rows.numel():
            y[rows] = expert_linear(h[rows], ids, self.w2)
            if self.b2 is not None:
                y[rows] += self.b2[ids]
        y *= weights.flatten()[:, None].to(y.dtype)
        ctx.moe_lora_w2(layer, h, local_ids, weights, y)
        return y.view(t, k, -1).sum(dim=1)


def _shard_attention(attn: Attention, rank: int, n: int) -> None:
    hq, hkv, d = attn.num_heads // n, attn.num_kv_heads // n, attn.head_dim
    attn.keep_heads(range(rank * hq, (rank + 1) * hq), range(rank * hkv, (rank + 1) * hkv))
    _row(attn.o_proj, rank * hq * d, hq * d, rank)
    if attn.sinks is not None:
        attn.sinks = _param(attn.sinks[rank * hq:(rank + 1) * hq])


def _shard_gated_mlp(mlp: GatedMLP, rank: int, n: int) -> None:
    inter = mlp.gate_proj.out_dim // n
    _column(mlp.gate_proj, rank * inter, inter)
    _column(mlp.up_proj, rank * inter, inter)
    _row(mlp.down_proj, rank * inter, inter, rank)


def _shard_experts(experts: Experts, rank: int, n: int) -> None:
    full, inter = experts.inter, experts.inter // n
    gate = slice(rank * inter, (rank + 1) * inter)
    up = slice(full + rank * inter, full + (rank + 1) * inter)
    experts.w13 = _param(torch.cat([experts.w13[:, gate], experts.w13[:, up]], dim=1))
    experts.w2 = _param(experts.w2[:, :, gate])
    if experts.b13 is not None:
        experts.b13 = _param(torch.cat([experts.b13[:, gate], experts.b13[:, up]], dim=1))
    experts.b2 = _zero_unless_first(experts.b2, rank)
    experts.inter = inter


def _partition_experts(experts: Experts, rank: int, n: int) -> None:
    per_rank = experts.num_experts // n
    own = slice(rank * per_rank, (rank + 1) * per_rank)
    for name in ("w13", "w2", "b13", "b2"):
        value = getattr(experts, name)
        if value is not None:
            setattr(experts, name, _param(value[own]))
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
