"""The running sequences' block tables, kept on the device between steps and updated by delta.

A sequence holds one row of an int32 [layers, rows + 1, width] table for as long as it holds KV
pages. A step writes only the entries of the blocks its sequences gained since they last ran (at
decode, one block per sequence every block_tokens tokens), so the host's work follows what
changed, not the pages held. The last row is the step graphs' padding row: zeros, never given
to a sequence. Attention reads the table through each token's row (StepMetadata.query_seq), and
seq_lens has one entry per row (0 for rows not in the step).

Every layer has its own entries: a block's pages come from the pool's free list one per layer,
in no fixed order, and sliding-window layers give theirs back on their own, so one shared table
plus a per-layer offset would need contiguous per-block allocation from the pool.

Blocks at or beyond `width` (sequences longer than the step graphs' tables) go to an overflow
table that grows on demand; a step that reaches them sees both joined (one device copy) and runs
eagerly, as no step graph is that wide. `width` itself never changes, so the graphs' pointers
stay valid; more rows than planned reallocate the table and bump `generation` (the graphs are
captured again).

Rows are handed out as sequences first appear in a step and taken back lazily: a row whose
sequence no longer holds the page list it mirrors (KVManager.free replaces seq.block_pages on
finish and preemption) is free again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from moelora.engine.request import Sequence


@dataclass
class _Row:
    index: int
    seq: Sequence
    pages: list  # the seq.block_pages list this row mirrors (by identity)
    synced: int = 0  # blocks already written to the device


@dataclass
class TableWrites:
    """One step's new table entries: flat int32 indices into the primary and overflow tables,
    and the page of each."""

    primary_index: list = field(default_factory=list)  # np.int32 arrays
    primary_page: list = field(default_factory=list)
    overflow_index: list = field(default_factory=list)
    overflow_page: list = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.concatenate(parts) if parts else np.empty(0, np.int32)
                     for parts in (self.primary_index, self.primary_page, self.overflow_index,
                                   self.overflow_page))


class BlockTable:
    def __init__(self, num_layers: int, rows: int, width: int, device: torch.device):
        if rows < 1 or width < 1:
            raise ValueError(f"a block table needs rows >= 1 and width >= 1, got {rows}, {width}")
        self.num_layers = num_layers
        self.width = width
        self.device = device
        self.table = _zeros(num_layers, rows + 1, width, device)
        self.overflow: torch.Tensor | None = None  # [layers, rows + 1, extra blocks]
        self.generation = 0  # bumped whenever self.table is reallocated
        self._rows: dict[int, _Row] = {}  # seq_id -> its row
        self._free = list(range(rows - 1, -1, -1))  # popped from the end: row 0 first

    @property
    def rows(self) -> int:
        """Rows sequences can hold (the padding row not counted)."""
        return self.table.shape[1] - 1

    @property
    def padding_row(self) -> int:
        return self.table.shape[1] - 1

    # -- host side ---------------------------------------------------------------------------
    def collect(self, seqs: list[Sequence]) -> tuple[list[int], TableWrites]:
        """The row of each sequence of a step and the entries the step must write first."""
        states: list[_Row | None] = []
        missing = 0
        for seq in seqs:
            state = self._rows.get(seq.seq_id)
            if state is not None and state.pages is not seq.block_pages:
                state.seq, state.pages, state.synced = seq, seq.block_pages, 0  # new pages
            missing += state is None
            states.append(state)
        if missing > len(self._free):
            self._reclaim()
            if missing > len(self._free):
                self._grow_rows(self.rows + missing - len(self._free))
        longest = max((len(seq.block_pages) for seq in seqs), default=0)
        if longest > self.width:
            self._ensure_overflow(longest - self.width)
        writes = TableWrites()
        rows = []
        for seq, state in zip(seqs, states):
            if state is None:
                state = _Row(self._free.pop(), seq, seq.block_pages)
                self._rows[seq.seq_id] = state
            if len(seq.block_pages) > state.synced:
                self._write(state, writes)
            rows.append(state.index)
        return rows, writes

    def _write(self, state: _Row, writes: TableWrites) -> None:
        first, pages = state.synced, state.pages
        new = np.asarray(pages[first:], dtype=np.int32)  # [blocks, layers]
        blocks = np.arange(first, len(pages), dtype=np.int64)
        layers = np.arange(self.num_layers, dtype=np.int64)
        near = blocks < self.width
        if near.any():
            width = self.width
            index = (layers[None, :] * (self.rows + 1) * width + state.index * width
                     + blocks[near][:, None])
            writes.primary_index.append(index.astype(np.int32).ravel())
            writes.primary_page.append(new[near].ravel())
        if not near.all():
            extra = self.overflow.shape[2]
            index = (layers[None, :] * (self.rows + 1) * extra + state.index * extra
                     + (blocks[~near] - self.width)[:, None])
            writes.overflow_index.append(index.astype(np.int32).ravel())
            writes.overflow_page.append(new[~near].ravel())
        state.synced = len(pages)

    def _reclaim(self) -> None:
        stale = [seq_id for seq_id, state in self._rows.items()
                 if state.seq.block_pages is not state.pages]
        for seq_id in stale:
            self._free.append(self._rows.pop(seq_id).index)

    # -- device side -------------------------------------------------------------------------
    def apply(self, primary_index: torch.Tensor, primary_page: torch.Tensor,
              overflow_index: torch.Tensor, overflow_page: torch.Tensor) -> None:
        """Writes a step's entries (device int32 tensors, as staged from TableWrites.arrays)."""
        if primary_index.numel():
            self.table.view(-1).index_copy_(0, primary_index.long(), primary_page)
        if overflow_index.numel():
            self.overflow.view(-1).index_copy_(0, overflow_index.long(), overflow_page)

    def view(self, width: int) -> torch.Tensor:
        """The tables of blocks [0, width): [layers, rows + 1, width], a view when width fits
        the primary table, else the primary and overflow tables joined."""
        if width <= self.width:
            return self.table[:, :, :width]
        return torch.cat([self.table, self.overflow[:, :, :width - self.width]], dim=2)

    def _grow_rows(self, rows: int) -> None:
        old = self.table
        self.table = _zeros(self.num_layers, rows + 1, self.width, self.device)
        self.table[:, :old.shape[1] - 1] = old[:, :-1]
        if self.overflow is not None:
            overflow = self.overflow
            self.overflow = _zeros(self.num_layers, rows + 1, overflow.shape[2], self.device)
            self.overflow[:, :overflow.shape[1] - 1] = overflow[:, :-1]
        self._free = list(range(rows - 1, old.shape[1] - 2, -1)) + self._free
        self.generation += 1

    def _ensure_overflow(self, extra: int) -> None:
        current = 0 if self.overflow is None else self.overflow.shape[2]
        if extra <= current:
            return
        size = max(extra, 2 * current)
        grown = _zeros(self.num_layers, self.rows + 1, size, self.device)
        if self.overflow is not None:
            grown[:, :, :current] = self.overflow
        self.overflow = grown


def _zeros(layers: int, rows: int, width: int, device: torch.device) -> torch.Tensor:
    if layers * rows * width >= 1 << 31:  # entries are addressed by int32 flat indices
        raise ValueError(f"a block table of {layers} layers x {rows} rows x {width} blocks "
                         f"has more than 2**31 entries")
    return torch.zeros(layers, rows, width, dtype=torch.int32, device=device)
