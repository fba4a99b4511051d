"""KV-cache pages of sequences, taken from the unified page pool.

A logical block holds block_tokens tokens of every layer; each layer's part is one pool page,
so a block costs num_layers pages. Pages come from the pool with eviction of idle adapters
allowed: KV grows into memory that cold adapters held. Allocation is all-or-nothing.
"""

from __future__ import annotations

from moelora.engine.request import Sequence

KV_KIND = "kv"


class KVManager:
    def __init__(self, pool, num_layers: int, block_tokens: int):
        self.pool = pool
        self.num_layers = num_layers
        self.block_tokens = block_tokens

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

    def free(self, seq: Sequence) -> None:
        if seq.block_pages:
            self.pool.free(KV_KIND, seq.seq_id)
        seq.block_pages = []

    def capacity_tokens(self) -> int:
        """Tokens one sequence could cache if it had the whole pool."""
        return (self.pool.num_pages // self.num_layers) * self.block_tokens
