"""The ForwardContext of the engine: attention over KV pages of the unified pool and per-token
LoRA deltas read in place through the adapter cache's row tables, all through moelora.ops.

One PagedContext serves one forward step. Its plans (ops.plan_lora for the MoE and the dense
sites, ops.plan_attention) are made once per step, on first use, and handed to every op. The
dense-LoRA row grouping is computed once per step; the MoE grouping once per layer (w13 and w2 of
a layer share the same routing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from moelora import ops
from moelora.engine.prefill_attention import PrefillSpan, attend_spans, spans_fit
from moelora.models.context import LoraDelta, delta_width
from moelora.ops import PlanOverrides


@dataclass
class StepMetadata:
    """A step's tensors. Sequences are addressed by their row of the block tables (see
    engine/block_table.py): rows not in the step have seq_len 0."""

    positions: torch.Tensor  # int64 [T] (rotary embeddings)
    query_pos: torch.Tensor  # int32 [T] the same positions, as the attention kernel takes them
    query_seq: torch.Tensor  # int32 [T] block-table row of each token's sequence
    seq_lens: torch.Tensor  # int32 [R] tokens cached per row after this step
    block_tables: torch.Tensor  # int32 [L, R, max_blocks]
    slot_mapping: torch.Tensor  # int64 [L, T] page * block_tokens + offset, -1: no KV write
    token_slot: torch.Tensor | None  # int32 [T] adapter slot, -1 = base; None if no adapters
    num_adapters: int | None = None  # distinct adapters among the step's tokens (None: unknown)
    num_seqs: int = 0  # sequences in the step (pure decode when it equals T)
    # Prefill spans (sequences with >= 2 step tokens; PrefillSpan.seq is the row) and the other
    # tokens' indices (int64 [T']), which the paged kernel serves; see prefill_attention.
    prefill_spans: tuple[PrefillSpan, ...] = ()
    paged_tokens: torch.Tensor | None = None

    def to(self, device) -> StepMetadata:
        """The same metadata with every tensor on `device` (other fields as they are)."""
        return self._map(lambda t: t.to(device))

    def compact(self) -> StepMetadata:
        """The same metadata in tensors of its own (not views of a runner's buffers), e.g. to
        be pickled."""
        return self._map(lambda t: t.clone(memory_format=torch.contiguous_format))

    def _map(self, convert) -> StepMetadata:
        return dataclasses.replace(self, **{
            f.name: convert(getattr(self, f.name)) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)})


class PagedContext:
    """ForwardContext over the page pool (see moelora.models.context)."""

    def __init__(self, meta: StepMetadata, kv_view, lora_views,
                 overrides: PlanOverrides | None = None):
        self.meta = meta
        self.kv_view = kv_view
        self.lora_views = lora_views  # LoraViews or None
        self.overrides = overrides  # forced plan choices (tests, benchmarks); None: the rules
        self._moe_plan = self._dense_plan = self._attention_plan = None  # made on first use
        self.token_slot = meta.token_slot
        self._dense_groups = None
        self._moe_groups: dict[int, tuple] = {}
        self._ids_source = self._ids_cache = None  # the last routing and its int32 copy
        self._paged_rows = None  # query_seq / query_pos of meta.paged_tokens
        self._kv_pages = None  # the pool's pages as a tensor view, made on first use
        # build_metadata leaves token_slot None when no token of the step has an adapter, so
        # this needs no device sync
        self._has_lora = meta.token_slot is not None

    # -- attention ---------------------------------------------------------------------------
    def attention(self, layer, q, k, v, *, scale, sliding_window, sinks, rope=None):
        # q, k and v may be strided views of one QKV output: every consumer below takes
        # strided rows and heads, so nothing is copied.
        slots = self.meta.slot_mapping[layer]
        if rope is not None:  # one kernel: q/k norm, rope, K and V into the pages
            rope.rotate_and_write(q, k, v, slots, self.kv_view)
        else:
            ops.kv_cache_write(k, v, slots, self.kv_view)
        spans = self.meta.prefill_spans
        if not spans_fit(spans, self._attention_plan_for(q)):
            return self._paged(layer, q, self.meta.query_seq, self.meta.query_pos, scale,
                               sliding_window, sinks)
        out = torch.empty_like(q)
        rest = self.meta.paged_tokens
        if rest is not None and rest.numel() > 0:
            if self._paged_rows is None:  # once per step, shared by the layers
                self._paged_rows = (self.meta.query_seq.index_select(0, rest),
                                    self.meta.query_pos.index_select(0, rest))
            out.index_copy_(0, rest, self._paged(layer, q.index_select(0, rest),
                                                 *self._paged_rows, scale, sliding_window,
                                                 sinks))
        attend_spans(q, k, v, spans, scale, sliding_window or 0,
                     None if sinks is None else sinks.float(), out,
                     lambda span, lo: self._cached_prefix(layer, span, lo))
        return out

    def _cached_prefix(self, layer, span, lo):
        """K and V of positions [lo, span.start) of the span's sequence, from the pool."""
        if self._kv_pages is None:
            self._kv_pages = ops.kv_cache_pages(self.kv_view)
        bt = self.kv_view.block_tokens
        table = self.meta.block_tables[layer, span.seq, lo // bt: -(-span.start // bt)]
        # clamp: a released page (-1) lies before the window, never in [lo, start)
        pages = self._kv_pages.index_select(0, table.clamp(min=0).long())  # [n, 2, bt, KV, D]
        flat = pages.transpose(0, 1).reshape(2, -1, *pages.shape[3:])
        begin = lo % bt
        return (flat[0, begin:begin + span.start - lo], flat[1, begin:begin + span.start - lo])

    def _attention_plan_for(self, q):
        if self._attention_plan is None:
            view = self.kv_view
            self._attention_plan = ops.plan_attention(
                num_heads=q.shape[1], num_kv_heads=view.num_kv_heads, head_dim=view.head_dim,
                page_bytes=view.page_bytes,
                max_context=self.meta.block_tables.shape[2] * view.block_tokens, dtype=q.dtype,
                device=q.device, overrides=self.overrides)
        return self._attention_plan

    def _paged(self, layer, q, query_seq, query_pos, scale, sliding_window, sinks):
        return ops.paged_attention(
            q, query_seq, query_pos, self.meta.block_tables[layer], self.meta.seq_lens,
            self.kv_view, scale=scale, sliding_window=sliding_window or 0,
            sinks=None if sinks is None else sinks.float().contiguous(),
            plan=self._attention_plan_for(q))

    # -- LoRA --------------------------------------------------------------------------------
    # Each delta goes into a zeroed tensor of its own, added to the base output by the caller
    # (LoraDelta.add_to). While a decode graph is captured its kernels go on the LoRA stream,
    # forked before the base op is enqueued, so in the graph they run beside the base GEMM:
    # at decode a LoRA launch is a chain of dependent DRAM round trips, not bytes, and beside a
    # bandwidth-bound GEMM it costs little. Elsewhere (prefill, the CPU) they run in line.
    def lora_delta(self, sites, layer, x):
        """One launch for every site of `sites` the pool holds (q, k and v of a QKV output:
        three decode launches a layer become one)."""
        held = [(site, first) for site, first, _ in sites
                if self._has_lora and self.lora_views.has_site(site)]
        if not held:
            return None
        return self._deferred(x, x.shape[0], delta_width(sites),
                              lambda delta: self._dense_lora(held, layer, x, delta))

    def _deferred(self, like, rows, width, launch) -> LoraDelta:
        """launch(delta) adds a LoRA delta into a zeroed [rows, width] tensor like `like`: on
        the LoRA stream while a graph is being captured, else in line."""
        if like.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            delta = like.new_zeros(rows, width)
            launch(delta)
            return LoraDelta(delta)
        stream = lora_stream(like.device)
        stream.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(stream):
            delta = like.new_zeros(rows, width)
            launch(delta)
            ready = torch.cuda.Event()
            ready.record(stream)
        return LoraDelta(delta, ready)

    def _dense_lora(self, held, layer, x, out):
        views = [self.lora_views.view(site, layer) for site, _ in held]
        firsts = [first for _, first in held]
        if self._dense_plan is None:  # every dense site of the step has the step's rows
            self._dense_plan = ops.plan_lora(x.shape[0], dense=True,
                                             num_adapters=self.meta.num_adapters, dtype=x.dtype,
                                             device=x.device, overrides=self.overrides)
        plan = self._dense_plan
        if plan.form == "unsorted":  # decode: no alignment launch
            ops.fused_moe_lora_unsorted(x, out, None, self.token_slot, views, firsts,
                                        input_pairs_per_row=1, plan=plan)
            return
        if self._dense_groups is None:
            self._dense_groups = ops.moe_lora_align(None, self.token_slot, 1,
                                                    self.lora_views.num_slots, plan.block_m,
                                                    plan=plan)
        sorted_rows, block_slot, _block_expert, num_blocks = self._dense_groups
        ops.dense_lora(x, out, sorted_rows, block_slot, num_blocks, plan.block_m, views, firsts,
                       plan=plan)

    def _moe_plan_for(self, x, topk_ids):
        if self._moe_plan is None:  # every MoE layer of the step has the step's pairs
            self._moe_plan = ops.plan_lora(
                topk_ids.numel(), num_experts=self.lora_views.num_experts,
                num_adapters=self.meta.num_adapters, dtype=x.dtype, device=x.device,
                overrides=self.overrides)
        return self._moe_plan

    def _ids32(self, topk_ids):
        """int32 contiguous routing, converted once per layer (w13 and w2 share it)."""
        if self._ids_source is not topk_ids:
            self._ids_source, self._ids_cache = topk_ids, topk_ids.to(torch.int32).contiguous()
        return self._ids_cache

    def _moe_groups_for(self, layer, topk_ids, plan):
        """(sorted_pairs, block_slot, block_expert, num_blocks) of this layer's routing."""
        groups = self._moe_groups.get(layer)
        if groups is None:
            groups = ops.moe_lora_align(topk_ids.to(torch.int32), self.token_slot,
                                        self.lora_views.num_experts, self.lora_views.num_slots,
                                        plan.block_m, plan=plan)
            self._moe_groups = {layer: groups}  # only the current layer is needed again
        return groups

    def moe_lora_w13_delta(self, layer, x, topk_ids, inter):
        if not self._has_lora or not self.lora_views.has_site("experts.gate"):
            return None
        return self._deferred(x, topk_ids.numel(), 2 * inter,
                              lambda h13: self._moe_lora_w13(layer, x, topk_ids, h13))

    def _moe_lora_w13(self, layer, x, topk_ids, h13):
        inter = h13.shape[1] // 2
        views = [self.lora_views.view("experts.gate", layer),
                 self.lora_views.view("experts.up", layer)]
        plan = self._moe_plan_for(x, topk_ids)
        if plan.form == "unsorted":  # decode: no alignment launch
            ops.fused_moe_lora_unsorted(x, h13, self._ids32(topk_ids), self.token_slot, views,
                                        [0, inter], input_pairs_per_row=topk_ids.shape[1],
                                        plan=plan)
            return
        groups = self._moe_groups_for(layer, topk_ids, plan)
        ops.fused_moe_lora(x, h13, *groups, plan.block_m, views, [0, inter],
                           input_pairs_per_row=topk_ids.shape[1],
                           num_adapters=self.meta.num_adapters, plan=plan)

    def moe_lora_w2_delta(self, layer, h, topk_ids, topk_weights, hidden):
        if not self._has_lora or not self.lora_views.has_site("experts.down"):
            return None
        return self._deferred(h, h.shape[0], hidden,
                              lambda y: self._moe_lora_w2(layer, h, topk_ids, topk_weights, y))

    def _moe_lora_w2(self, layer, h, topk_ids, topk_weights, y):
        weights = topk_weights.reshape(-1).float().contiguous()
        plan = self._moe_plan_for(h, topk_ids)
        if plan.form == "unsorted":
            ops.fused_moe_lora_unsorted(h, y, self._ids32(topk_ids), self.token_slot,
                                        [self.lora_views.view("experts.down", layer)], [0],
                                        input_pairs_per_row=1, topk_weights=weights, plan=plan)
            return
        groups = self._moe_groups_for(layer, topk_ids, plan)
        ops.fused_moe_lora(h, y, *groups, plan.block_m,
                           [self.lora_views.view("experts.down", layer)], [0],
                           input_pairs_per_row=1, topk_weights=weights,
                           num_adapters=self.meta.num_adapters, plan=plan)


_LORA_STREAMS: dict[int, torch.cuda.Stream] = {}


def lora_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream a device's captured LoRA kernels run on: a branch of the graph beside the
    base ops. Of the default priority: a replay runs every node at its launch stream's priority,
    and replays at per-node priorities measured no faster (docs/performance.md)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _LORA_STREAMS.get(index)
    if stream is None:
        stream = _LORA_STREAMS[index] = torch.cuda.Stream(index)
    return stream
