"""A step's inputs on the device: packed on the host, sent in one copy, expanded on the device.

The host writes the step's int32 arrays (token ids, positions, rows, adapter slots, seq_lens per
row, the block-table entries that changed, the rows to sample, ...) one after another into one
pinned buffer and copies it to the device once, without waiting. Everything derived from them
(int64 ids and positions, the per-layer KV slot of every token) is computed on the device by
`step_metadata`: inside the step graphs that is part of the captured work, so a replayed step
costs the host only the packing and the copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from moelora.engine.paged_context import StepMetadata
from moelora.engine.prefill_attention import PrefillSpan


def send(parts: list, device: torch.device, target: torch.Tensor | None = None
         ) -> list[torch.Tensor]:
    """Copies int32 arrays (lists or numpy arrays) to the device in one host-to-device copy
    (into `target`'s front when given, else a new buffer) and returns one device view per part.
    The host buffer is pinned and comes from torch's caching host allocator, which reuses it
    only once the copy that reads it has run."""
    sizes = [len(part) for part in parts]
    total = sum(sizes)
    pinned = device.type == "cuda"
    host = torch.empty(max(total, 1), dtype=torch.int32, pin_memory=pinned)
    array = host.numpy()
    offset = 0
    for part, size in zip(parts, sizes):
        array[offset:offset + size] = part
        offset += size
    if device.type == "cpu" and target is None:
        staged = host
    else:
        staged = target if target is not None else torch.empty(max(total, 1), dtype=torch.int32,
                                                                device=device)
        if total:
            staged[:total].copy_(host[:total], non_blocking=pinned)
    views, offset = [], 0
    for size in sizes:
        views.append(staged[offset:offset + size])
        offset += size
    return views


def step_metadata(ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                  slots: torch.Tensor | None, seq_lens: torch.Tensor, tables: torch.Tensor,
                  block_tokens: int, *, padding_row: int | None = None,
                  num_adapters: int | None = None, num_seqs: int = 0,
                  spans: tuple[PrefillSpan, ...] = (),
                  paged_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, StepMetadata]:
    """int64 token ids and the StepMetadata of a step, from its int32 device arrays: ids,
    positions, rows, slots [T] (slots None: no token has an adapter), seq_lens [rows + 1] and
    tables [layers, rows + 1, width]. Tokens of `padding_row` write no KV. No host sync."""
    positions64 = positions.long()
    # tables may be a narrowed view of the runner's table: gather through its strides, from the
    # [layers, one layer's entries] rows of its storage (no copy of the table)
    layers, layer_stride = tables.shape[0], tables.stride(0)
    entries = rows.long() * tables.stride(1) + (positions64 // block_tokens) * tables.stride(2)
    pages = tables.as_strided((layers, layer_stride), (layer_stride, 1)).index_select(
        1, entries)  # [layers, T]
    slot_mapping = pages.long() * block_tokens + positions64 % block_tokens
    if padding_row is not None:
        slot_mapping.masked_fill_(rows == padding_row, -1)
    meta = StepMetadata(positions=positions64, query_pos=positions, query_seq=rows,
                        seq_lens=seq_lens, block_tables=tables, slot_mapping=slot_mapping,
                        token_slot=slots, num_adapters=num_adapters, num_seqs=num_seqs,
                        prefill_spans=spans, paged_tokens=paged_tokens)
    return ids.long(), meta


@dataclass
class HostStep:
    """A step's int32 arrays as the host builds them (ModelRunner.prepare)."""

    ids: list[int]
    positions: list[int]
    rows: list[int]
    slots: list[int] | None  # None: no token has an adapter
    seq_lens: np.ndarray  # [rows + 1]
    sample_rows: list[int]
    feed_dst: list[int]  # step tokens whose id is a pending token of the step before ...
    feed_src: list[int]  # ... at this index of that step's sampled tokens
    spans: tuple[PrefillSpan, ...]
    num_seqs: int
    num_adapters: int
    width: int  # block-table width the step needs

    def paged_tokens(self) -> np.ndarray:
        """Indices of the tokens outside the prefill spans."""
        inside = np.zeros(len(self.ids), dtype=bool)
        for span in self.spans:
            inside[span.first:span.first + span.count] = True
        return np.flatnonzero(~inside).astype(np.int32)

    def pad(self, size: int, padding_row: int) -> None:
        """Pads the token arrays to `size` with rows that decode a dummy token (step graphs)."""
        tokens = len(self.ids)
        extra = size - tokens
        self.ids += [0] * extra
        self.positions += [0] * extra
        self.rows += [padding_row] * extra
        self.slots = (self.slots or [-1] * tokens) + [-1] * extra


@dataclass
class PreparedStep:
    """A step ready to run: its arrays on the device (views of one staged buffer)."""

    num_seqs: int
    num_tokens: int  # without padding
    bucket: int | None  # the step graph's padded size, None: eager
    lora: bool  # some token has an adapter
    num_adapters: int
    width: int
    ids: torch.Tensor  # int32 [T or bucket]
    positions: torch.Tensor  # int32
    rows: torch.Tensor  # int32, block-table row of each token
    slots: torch.Tensor | None  # int32 adapter slot per token; None: no adapter in the step
    seq_lens: torch.Tensor  # int32 [rows + 1]
    writes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # BlockTable.apply
    feed_dst: torch.Tensor
    feed_src: torch.Tensor
    sample_rows: torch.Tensor  # int32: the tokens whose logits are taken (sampled, then
    #                            prompt-logprob rows)
    num_sample: int
    samples_every_token: bool  # sample_rows == range(num_tokens)
    spans: tuple[PrefillSpan, ...] = ()
    paged_tokens: torch.Tensor | None = None
