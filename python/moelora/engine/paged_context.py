"""The ForwardContext of the engine: attention over KV pages of the unified pool and per-token
LoRA deltas read in place through the adapter cache's row tables, all through moelora.ops.

One PagedContext serves one forward step. The dense-LoRA row grouping is computed once per
step; the MoE grouping once per layer (w13 and w2 of a layer share the same routing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from moelora import ops
from moelora.engine.prefill_attention import PrefillSpan, attend_spans, spans_fit


@dataclass
class StepMetadata:
    positions: torch.Tensor  # int64 [T] (rotary embeddings)
    query_pos: torch.Tensor  # int32 [T] the same positions, as the attention kernel takes them
    query_seq: torch.Tensor  # int32 [T] index of each token's sequence in the step
    seq_lens: torch.Tensor  # int32 [S] tokens cached per sequence after this step
    block_tables: torch.Tensor  # int32 [L, S, max_blocks]
    slot_mapping: torch.Tensor  # int64 [L, T] page * block_tokens + offset
    token_slot: torch.Tensor | None  # int32 [T] adapter slot, -1 = base; None if no adapters
    num_adapters: int | None = None  # distinct adapters among the step's tokens (None: unknown)
    # Prefill spans (sequences with >= 2 step tokens) and the other tokens' indices (int64
    # [T']), which the paged kernel serves; see moelora.engine.prefill_attention.
    prefill_spans: tuple[PrefillSpan, ...] = ()
    paged_tokens: torch.Tensor | None = None

    def to(self, device) -> StepMetadata:
        """The same metadata with every tensor on `device` (other fields as they are)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)})


class PagedContext:
    """ForwardContext over the page pool (see moelora.models.context)."""

    def __init__(self, meta: StepMetadata, kv_view, lora_views, dense_block_m: int = 16):
        self.meta = meta
        self.kv_view = kv_view
        self.lora_views = lora_views  # LoraViews or None
        self.dense_block_m = dense_block_m  # MoE sites: ops.grouped_block_m per layer
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
        if not spans_fit(spans, q.device):
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

    def _paged(self, layer, q, query_seq, query_pos, scale, sliding_window, sinks):
        return ops.paged_attention(
            q, query_seq, query_pos, self.meta.block_tables[layer], self.meta.seq_lens,
            self.kv_view, scale=scale, sliding_window=sliding_window or 0,
            sinks=None if sinks is None else sinks.float().contiguous())

    # -- LoRA --------------------------------------------------------------------------------
    def apply_lora(self, site, layer, x, out):
        if not self._has_lora or not self.lora_views.has_site(site):
            return
        if ops.prefer_unsorted(x.shape[0], dense=True):  # decode: no alignment launch
            ops.fused_moe_lora_unsorted(x, out, None, self.token_slot,
                                        [self.lora_views.view(site, layer)], [0],
                                        input_pairs_per_row=1)
            return
        if self._dense_groups is None:
            self._dense_groups = ops.moe_lora_align(None, self.token_slot, 1,
                                                    self.lora_views.num_slots,
                                                    self.dense_block_m)
        sorted_rows, block_slot, _block_expert, num_blocks = self._dense_groups
        ops.dense_lora(x, out, sorted_rows, block_slot, num_blocks, self.dense_block_m,
                       [self.lora_views.view(site, layer)], [0])

    def _unsorted(self, topk_ids) -> bool:
        return ops.prefer_unsorted(topk_ids.numel(), num_experts=self.lora_views.num_experts,
                                   num_adapters=self.meta.num_adapters)

    def _ids32(self, topk_ids):
        """int32 contiguous routing, converted once per layer (w13 and w2 share it)."""
        if self._ids_source is not topk_ids:
            self._ids_source, self._ids_cache = topk_ids, topk_ids.to(torch.int32).contiguous()
        return self._ids_cache

    def _moe_groups_for(self, layer, topk_ids):
        """(sorted_pairs, block_slot, block_expert, num_blocks, block_m) of this layer's routing."""
        groups = self._moe_groups.get(layer)
        if groups is None:
            block_m = ops.grouped_block_m(topk_ids.numel(), self.lora_views.num_experts,
                                          self.meta.num_adapters)
            groups = (*ops.moe_lora_align(topk_ids.to(torch.int32), self.token_slot,
                                          self.lora_views.num_experts,
                                          self.lora_views.num_slots, block_m), block_m)
            self._moe_groups = {layer: groups}  # only the current layer is needed again
        return groups

    def moe_lora_w13(self, layer, x, topk_ids, h13):
        if not self._has_lora or not self.lora_views.has_site("experts.gate"):
            return
        inter = h13.shape[1] // 2
        views = [self.lora_views.view("experts.gate", layer),
                 self.lora_views.view("experts.up", layer)]
        if self._unsorted(topk_ids):  # decode: no alignment launch
            ops.fused_moe_lora_unsorted(x, h13, self._ids32(topk_ids), self.token_slot, views,
                                        [0, inter], input_pairs_per_row=topk_ids.shape[1])
            return
        *groups, block_m = self._moe_groups_for(layer, topk_ids)
        ops.fused_moe_lora(x, h13, *groups, block_m, views, [0, inter],
                           input_pairs_per_row=topk_ids.shape[1],
                           num_adapters=self.meta.num_adapters)

    def moe_lora_w2(self, layer, h, topk_ids, topk_weights, y):
        if not self._has_lora or not self.lora_views.has_site("experts.down"):
            return
        weights = topk_weights.reshape(-1).float().contiguous()
        if self._unsorted(topk_ids):
            ops.fused_moe_lora_unsorted(h, y, self._ids32(topk_ids), self.token_slot,
                                        [self.lora_views.view("experts.down", layer)], [0],
                                        input_pairs_per_row=1, topk_weights=weights)
            return
        *groups, block_m = self._moe_groups_for(layer, topk_ids)
        ops.fused_moe_lora(h, y, *groups, block_m, [self.lora_views.view("experts.down", layer)], [0],
                           input_pairs_per_row=1, topk_weights=weights,
                           num_adapters=self.meta.num_adapters)
