"""KV-cache pages of sequences, taken from the unified page pool.

A logical block holds block_tokens tokens of every layer; each layer's part is one pool page,
so a block costs num_layers pages. Pages come from the pool with eviction of idle adapters
allowed: KV grows into memory that cold adapters held. Allocation is all-or-nothing.

Sliding-window layers (GPT-OSS alternates them with full attention) never read keys more than
`window` positions behind the newest query, so once a block has fallen out of every future
query's window its page of that layer goes back to the pool (release_behind_window). The block
table keeps the stale page id: the attention kernels only read positions inside the window.

With a PrefixCache, the full blocks of a prompt are allocated under owners of their own, shared
with later sequences whose prompts (and adapter) start the same way; see prefix_cache.py.

A sequence's own pages belong to a pool owner taken fresh each time it gets pages after having
none (kv_owner), so pages it gave back never mix with pages it holds later.

Frees wait for the GPU when it may still use the pages. With async scheduling the engine
launches a step and frees pages (a sequence that finished, was aborted or preempted, pages behind
a window) before that step has run; the pool could hand them at once to an adapter load, whose
copy runs on another stream. So while `fence` (the last launched step) is not done, frees are
queued and go back to the pool once their step is done (settle, or any allocation); a
reservation that cannot be met waits for them before it reports failure.
"""

from __future__ import annotations

import itertools
from typing import Protocol

from moelora.engine.prefix_cache import PrefixCache
from moelora.engine.request import Sequence

KV_KIND = "kv"


class StepFence(Protocol):
    """A launched step: done() without blocking, wait() until it has run."""

    def done(self) -> bool: ...

    def wait(self) -> None: ...


class KVManager:
    def __init__(self, pool, num_layers: int, block_tokens: int,
                 sliding_windows: tuple[int | None, ...] = (),
                 prefix_cache: PrefixCache | None = None):
        self.pool = pool
        self.num_layers = num_layers
        self.block_tokens = block_tokens
        self.prefix_cache = prefix_cache
        self.fence: StepFence | None = None  # the last launched step, while it may be running
        self._deferred: list[tuple[StepFence, int, list[int] | None]] = []  # (fence, owner, pages)
        self._owner_ids = itertools.count(1)  # prefix-cache blocks own ids from OWNER_BASE up
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
        """Makes room for `total_tokens` cached tokens of `seq`. False if the pool cannot
        (after evicting cached prefix blocks nobody uses)."""
        missing = self.blocks_for(total_tokens) - len(seq.block_pages)
        if missing <= 0:
            return True
        self.settle()
        if self._allocate_blocks(seq, missing):
            return True
        if self._deferred:  # pages on their way back: wait for the step that holds them
            self.wait_for_deferred()
            if self._allocate_blocks(seq, missing):
                return True
        if not self._evict_cached(missing * self.num_layers):
            return False
        self.wait_for_deferred()
        return self._allocate_blocks(seq, missing)

    def _allocate_blocks(self, seq: Sequence, missing: int) -> bool:
        """All or nothing: full prompt blocks (when caching) under owners of their own, the
        rest under the sequence."""
        first = len(seq.block_pages)
        cacheable = len(seq.prompt_token_ids) // self.block_tokens if self.prefix_cache else 0
        shared: list[tuple[int, int, list[int]]] = []  # (block, owner, pages)
        for block in range(first, min(first + missing, cacheable)):
            owner = self.prefix_cache.new_owner()
            outcome = self.pool.try_allocate(KV_KIND, owner, self.num_layers, evict=True)
            if not outcome.ok:
                for _, taken, _ in shared:
                    self.pool.free(KV_KIND, taken)
                return False
            shared.append((block, owner, list(outcome.pages)))
        private = missing - len(shared)
        pages: list[int] = []
        if private:
            owner = seq.kv_owner if seq.kv_owner is not None else next(self._owner_ids)
            outcome = self.pool.try_allocate(KV_KIND, owner, private * self.num_layers,
                                             evict=True)
            if not outcome.ok:
                for _, taken, _ in shared:
                    self.pool.free(KV_KIND, taken)
                return False
            seq.kv_owner = owner
            pages = list(outcome.pages)
        for block, owner, block_pages in shared:
            seq.block_pages.append(block_pages)
            seq.prefix_owners[block] = owner
        for b in range(private):
            seq.block_pages.append(pages[b * self.num_layers:(b + 1) * self.num_layers])
        return True

    # -- prefix caching ----------------------------------------------------------------------
    def attach_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence about to start (no pages yet): takes the cached blocks its prompt
        starts with and marks their tokens computed (at least one prompt token is always left
        to compute, for the logits). Returns the tokens reused."""
        cache = self.prefix_cache
        if cache is None or seq.block_pages:
            return 0
        prompt, bt = seq.prompt_token_ids, self.block_tokens
        key = -1 if seq.adapter_id is None else int(seq.adapter_id)
        seq.prefix_digests = cache.chain(prompt, key, bt, len(prompt) // bt)
        matched = 0
        for digest in seq.prefix_digests[:(len(prompt) - 1) // bt]:
            block = cache.lookup(digest)
            if block is None:
                break
            cache.acquire(block)
            seq.prefix_owners[matched] = block.owner
            seq.block_pages.append(list(block.pages))
            matched += 1
        seq.published_blocks = matched
        seq.num_computed_tokens = matched * bt
        return matched * bt

    def publish_computed(self, seq: Sequence) -> None:
        """After a step: offers the prompt blocks this sequence has now fully computed."""
        cache = self.prefix_cache
        if cache is None:
            return
        done = min(seq.num_computed_tokens, len(seq.prompt_token_ids)) // self.block_tokens
        for block in range(seq.published_blocks, done):
            owner = seq.prefix_owners.get(block)
            if owner is not None and not cache.is_published(owner):
                # False: an identical block was published meanwhile; this copy stays private
                cache.publish(seq.prefix_digests[block], owner, seq.block_pages[block])
        seq.published_blocks = max(seq.published_blocks, done)

    def evict_cached_blocks(self) -> None:
        """Frees every cached prefix block no sequence references."""
        self._evict_cached(self.pool.num_pages)

    def _evict_cached(self, pages_needed: int) -> bool:
        cache = self.prefix_cache
        if cache is None:
            return False
        freed = 0
        for block in cache.evictable():
            if freed >= pages_needed:
                break
            self._release(block.owner)
            cache.forget(block)
            freed += len(block.pages)
        return freed > 0

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
                if block in seq.prefix_owners:
                    continue  # a shareable prompt block: whole, for later sequences
                freed.extend(seq.block_pages[block][layer] for layer in layers)
            if dead > done:
                seq.window_released[window] = dead
        if freed:
            self._release(seq.kv_owner, freed)
        return len(freed)

    def free(self, seq: Sequence) -> None:
        for owner in seq.prefix_owners.values():
            if self.prefix_cache.is_published(owner):
                self.prefix_cache.release(owner)  # stays cached for later prompts
            else:
                self._release(owner)  # never computed, or a duplicate
        if seq.kv_owner is not None:  # blocks the sequence owns itself
            self._release(seq.kv_owner)
            seq.kv_owner = None
        seq.block_pages = []
        seq.window_released = {}
        seq.prefix_owners = {}
        seq.prefix_digests = []
        seq.published_blocks = 0

    # -- frees behind a running step ---------------------------------------------------------
    def _release(self, owner: int, pages: list[int] | None = None) -> None:
        """Gives `pages` of `owner` (None: all of them, and the owner) back to the pool, or
        queues them while the last launched step may still use them."""
        self.settle()
        if self.fence is not None and not self.fence.done():
            self._deferred.append((self.fence, owner, pages))
        elif pages is None:
            self.pool.free(KV_KIND, owner)
        else:
            self.pool.free_pages(KV_KIND, owner, pages)

    def settle(self) -> None:
        """Gives back the queued frees whose step is done, in the order they were made."""
        done = 0
        for fence, owner, pages in self._deferred:
            if not fence.done():
                break
            if pages is None:
                self.pool.free(KV_KIND, owner)
            else:
                self.pool.free_pages(KV_KIND, owner, pages)
            done += 1
        del self._deferred[:done]
        if self.fence is not None and not self._deferred and self.fence.done():
            self.fence = None

    def wait_for_deferred(self) -> None:
        """Waits for the steps that queued frees, then gives every queued page back."""
        if self._deferred:
            self._deferred[-1][0].wait()  # steps run in launch order: the last one is enough
        self.settle()

    @property
    def deferred_frees(self) -> int:
        return len(self._deferred)

    def capacity_tokens(self) -> int:
        """Tokens one sequence could cache if it had the whole pool."""
        return (self.pool.num_pages // self.num_layers) * self.block_tokens

    def min_pages_for(self, num_tokens: int) -> int:
        """The fewest pages a sequence of num_tokens tokens holds at its end: every block of the
        full-attention layers, and of a sliding-window layer only the blocks its window spans
        (those behind it go back to the pool)."""
        blocks = self.blocks_for(num_tokens)
        windowed = sum(len(layers) for layers in self._window_layers.values())
        pages = blocks * (self.num_layers - windowed)
        for window, layers in self._window_layers.items():
            pages += min(blocks, self.blocks_for(window)) * len(layers)
        return pages

    def max_tokens_within(self, num_pages: int) -> int | None:
        """The longest sequence whose min_pages_for fits in num_pages pages; None when there is
        no bound (every layer has a sliding window and their windows fit)."""
        if self.min_pages_for(1) > num_pages:
            return 0
        if self.min_pages_for(1 << 40) <= num_pages:
            return None
        low, high = 1, 1 << 40  # min_pages_for(low) fits, min_pages_for(high) does not
        while high - low > 1:
            middle = (low + high) // 2
            if self.min_pages_for(middle) <= num_pages:
                low = middle
            else:
                high = middle
        return low
