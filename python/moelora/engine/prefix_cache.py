"""Automatic prefix caching: KV blocks of identical prompt prefixes are computed once.

A full block of prompt tokens is named by a chained digest of (the previous block's digest,
the adapter, the block's tokens): two sequences share it only if their prompts agree up to and
including that block AND they use the same adapter (LoRA on q/k/v changes the keys and values).
Such blocks live in the unified pool under an owner of their own ("kv", id >= OWNER_BASE), not
under a sequence, so they outlive the sequence that computed them. Sequences hold references;
a block nobody references stays cached and is evicted least recently used when the pool needs
its pages (before any running sequence is preempted).
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from dataclasses import dataclass

OWNER_BASE = 1 << 48  # pool owner ids of cached blocks; sequence ids stay far below


@dataclass
class CachedBlock:
    owner: int
    pages: list[int]  # one per layer
    refs: int
    last_use: int


class PrefixCache:
    def __init__(self):
        self.blocks: dict[bytes, CachedBlock] = {}
        self._by_owner: dict[int, bytes] = {}
        self._owner_ids = itertools.count(OWNER_BASE)
        self._clock = itertools.count()
        self.query_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of which were found cached
        self.evicted_blocks = 0

    @staticmethod
    def chain(prompt: list[int], adapter_key: int, block_tokens: int, num_blocks: int) -> list[bytes]:
        """Digests of the first num_blocks full blocks of `prompt`."""
        digests, previous = [], b""
        for b in range(num_blocks):
            tokens = array("q", prompt[b * block_tokens:(b + 1) * block_tokens]).tobytes()
            h = hashlib.blake2b(previous + adapter_key.to_bytes(8, "little", signed=True) + tokens,
                                digest_size=16)
            previous = h.digest()
            digests.append(previous)
        return digests

    def record_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Counts one admitted sequence's lookup (attempts that had to wait do not count)."""
        self.query_tokens += prompt_tokens
        self.hit_tokens += hit_tokens

    def new_owner(self) -> int:
        return next(self._owner_ids)

    def lookup(self, digest: bytes) -> CachedBlock | None:
        return self.blocks.get(digest)

    def acquire(self, block: CachedBlock) -> None:
        block.refs += 1
        block.last_use = next(self._clock)

    def publish(self, digest: bytes, owner: int, pages: list[int]) -> bool:
        """Registers a block its sequence has just computed (the sequence holds one reference).
        False when an identical block is cached already (computed concurrently)."""
        if digest in self.blocks:
            return False
        self.blocks[digest] = CachedBlock(owner, list(pages), 1, next(self._clock))
        self._by_owner[owner] = digest
        return True

    def is_published(self, owner: int) -> bool:
        return owner in self._by_owner

    def release(self, owner: int) -> None:
        block = self.blocks[self._by_owner[owner]]
        block.refs -= 1
        block.last_use = next(self._clock)

    def evictable(self) -> list[CachedBlock]:
        """Blocks no sequence references, least recently used first."""
        return sorted((b for b in self.blocks.values() if b.refs == 0), key=lambda b: b.last_use)

    def forget(self, block: CachedBlock) -> None:
        del self.blocks[self._by_owner.pop(block.owner)]
        self.evicted_blocks += 1
