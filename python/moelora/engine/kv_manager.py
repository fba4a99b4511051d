"""KV-cache pages of sequences, taken from the unified page pool.

A logical block holds block_tokens tokens of every layer; each layer's part is one pool page,
so a block costs num_layers pages. Pages come from the pool with eviction of idle adapters
allowed: KV grows into memory that cold adapters held. Allocation is all-or-nothing.

Sliding-window layers (GPT-OSS alternates them with full attention) never read keys more than
`window` positions behind the newest query, so once a block has fallen out of every future
query's window its page of that layer goes back to the pool (release_behind_window). The block
table keeps the stale page id: the attention kernels only read positions inside the window.
"""

from __future__ import annotations

from moelora.engine.request import Sequence

KV_KIND = "kv"


class KVManager:
    def __init__(self, pool, num_layers: int, block_tokens: int,
                 sliding_windows: tuple[int | None, ...] = ()):
        self.pool = pool
        self.num_layers = num_layers
        self.block_tokens = block_tokens
        # layers by window size: the pages of one window size are released together
        self._window_layers: dict[int, list[int]] = {}
        for layer, window in enumerate(sliding_windows):
            if window:
                self._window_layers.setdefault(int(window), []).append(layer)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    def pages_for(self, num_tokens: int) -> int:
        return self.blocks_for(num_tokens) * self.num_layers

    def reserve(self, seq: Sequence, total_tokens: int) -> bool:
        """Makes room for `total_tokens` cached tokens of `seq`. False if the pool cannot."""
        missing_blocks = self.blocks_for(total_tokens) - len(seq.block_pages)
        if missing_blocks <= 0:
            return True
        outcome = self.pool.try_allocate(KV_KIND, seq.seq_id, missing_blocks * self.num_layers,
                                         evict=True)
        if not outcome.ok:
            return False
        pages = list(outcome.pages)
        for b in range(missing_blocks):
            seq.block_pages.append(pages[b * self.num_layers:(b + 1) * self.num_layers])
        return True

    def release_behind_window(self, seq: Sequence) -> int:
        """Returns to the pool the sliding-window layers' pages of blocks that no query at or
        after position seq.num_computed_tokens can attend to; returns how many."""
        freed: list[int] = []
        for window, layers in self._window_layers.items():
            # the next query (position p = num_computed_tokens) reads keys j > p - window
            first_needed = seq.num_computed_tokens - window + 1
            done = seq.window_released.get(window, 0)
            dead = max(0, min(first_needed // self.block_tokens, len(seq.block_pages)))
            for block in range(done, dead):
                freed.extend(seq.block_pages[block][layer] for layer in layers)
            if dead > done:
                seq.window_released[window] = dead
        if freed:
            self.pool.free_pages(KV_KIND, seq.seq_id, freed)
        return len(freed)

    def free(self, seq: Sequence) -> None:
        if seq.block_pages:
            self.pool.free(KV_KIND, seq.seq_id)
        seq.block_pages = []
        seq.window_released = {}

    def capacity_tokens(self) -> int:
        """Tokens one sequence could cache if it had the whole pool."""
        return (self.pool.num_pages // self.num_layers) * self.block_tokens
