"""Keeps every rank's page pool and adapter cache in the same state as rank 0's.

Each rank has its own pool (same page count and size) and adapter cache (its shard of every
adapter takes the same number of pages on every rank). Rank 0's scheduler decides; every call
that changes its pool or cache (KV allocations and frees, adapter registration, prefetch,
set_demand, touch, note_request, pin, unpin, unregister) is recorded, in order, by the proxies
below and replayed by the other ranks before the step's forward. Both state machines are
deterministic given the call sequence (LRU order and popularity count calls), except for the
timing of the cache's asynchronous loads, so in a parallel engine a prefetch waits for every
load it started: loads do not overlap compute there (a known cost, see executor.py). Replays
check that they got the same KV pages and adapter slots as rank 0 and fail loudly otherwise:
the ranks' pages must never silently diverge.
"""

from __future__ import annotations

import threading

from moelora import _C
from moelora.engine.adapters import LoRARequest


def settle(cache) -> None:
    """Waits until no load of `cache` is in flight (each ends resident, failed or waiting for
    memory), so the cache's state no longer depends on timing."""
    for adapter_id in cache.adapter_ids():
        if cache.residency(adapter_id) == _C.Residency.LOADING:
            try:
                cache.wait(adapter_id)
            except _C.MoeloraError:
                pass  # failed or waiting for memory: a settled state as well


class OpLog:
    """The ordered calls of rank 0 that the other ranks replay; one lock makes the native call
    and its record one step, whatever thread (engine loop, API) made it."""

    def __init__(self):
        self.lock = threading.RLock()
        self._ops: list[tuple] = []

    def append(self, op: tuple) -> None:
        self._ops.append(op)

    def drain(self) -> list[tuple]:
        with self.lock:
            ops, self._ops = self._ops, []
            return ops


class RecordingPool:
    """Rank 0's PagePool as the KVManager sees it: allocations and frees are recorded."""

    def __init__(self, pool, log: OpLog):
        self._pool = pool
        self._log = log

    def try_allocate(self, kind, owner, num_pages, evict=False):
        with self._log.lock:
            outcome = self._pool.try_allocate(kind, owner, num_pages, evict=evict)
            pages = list(outcome.pages) if outcome.ok else None
            self._log.append(("allocate", kind, owner, num_pages, evict, pages))
            return outcome

    def free(self, kind, owner):
        with self._log.lock:
            self._pool.free(kind, owner)
            self._log.append(("free", kind, owner))

    def free_pages(self, kind, owner, pages):
        with self._log.lock:
            self._pool.free_pages(kind, owner, pages)
            self._log.append(("free_pages", kind, owner, list(pages)))

    def __getattr__(self, name):
        return getattr(self._pool, name)


class RecordingCache:
    """Rank 0's AdapterCache as the AdapterManager sees it: state changes are recorded and
    prefetch is synchronous (see the module docstring)."""

    def __init__(self, cache, log: OpLog, adapter_paths: dict[str, str]):
        self._cache = cache
        self._log = log
        self._paths = adapter_paths  # adapter name -> PEFT directory, from the plan

    def register_adapter(self, spec):
        with self._log.lock:
            adapter_id = self._cache.register_adapter(spec)
            self._log.append(("register", spec.name, self._paths[spec.name], adapter_id))
            return adapter_id

    def unregister(self, adapter_id):
        with self._log.lock:
            self._cache.unregister(adapter_id)
            self._log.append(("unregister", adapter_id))

    # `background` is not honoured: every rank must reach the same state from the same calls,
    # so loads start (and settle) on the calling thread.
    def prefetch(self, adapter_id, background=False):
        with self._log.lock:
            self._cache.prefetch(adapter_id)
            settle(self._cache)
            self._log.append(("prefetch", adapter_id))
            return self._cache.residency(adapter_id)

    def prefetch_host(self, adapter_id):
        with self._log.lock:
            self._cache.prefetch_host(adapter_id)
            self._log.append(("prefetch_host", adapter_id))

    def set_demand(self, queued_adapters, background=False):
        with self._log.lock:
            self._cache.set_demand(queued_adapters)
            settle(self._cache)
            self._log.append(("set_demand", list(queued_adapters)))

    def touch(self, adapter_id):
        with self._log.lock:
            self._cache.touch(adapter_id)
            self._log.append(("touch", adapter_id))

    def note_request(self, adapter_id):
        with self._log.lock:
            self._cache.note_request(adapter_id)
            self._log.append(("note_request", adapter_id))

    def acquire(self, adapter_id):
        with self._log.lock:
            slot = self._cache.acquire(adapter_id)  # raises without changing anything
            self._log.append(("acquire", adapter_id, slot))
            return slot

    def release(self, adapter_id):
        with self._log.lock:
            self._cache.release(adapter_id)
            self._log.append(("release", adapter_id))

    def __getattr__(self, name):
        return getattr(self._cache, name)


class Replayer:
    """Applies rank 0's recorded calls to this rank's pool and AdapterManager."""

    def __init__(self, pool, adapters, rank: int):
        self.pool = pool
        self.adapters = adapters
        self.rank = rank

    def _diverged(self, what: str):
        return RuntimeError(f"rank {self.rank} diverged from rank 0: {what}; the ranks' page "
                            f"pools or adapter caches no longer match")

    def replay(self, ops: list[tuple]) -> None:
        cache = self.adapters.cache
        for op in ops:
            kind = op[0]
            if kind == "allocate":
                _, pool_kind, owner, num_pages, evict, pages = op
                outcome = self.pool.try_allocate(pool_kind, owner, num_pages, evict=evict)
                mine = list(outcome.pages) if outcome.ok else None
                if mine != pages:
                    raise self._diverged(f"allocating {num_pages} {pool_kind} pages for {owner} "
                                         f"gave {mine}, rank 0 got {pages}")
            elif kind == "free":
                self.pool.free(op[1], op[2])
            elif kind == "free_pages":
                self.pool.free_pages(op[1], op[2], op[3])
            elif kind == "register":
                _, name, path, adapter_id = op
                mine = self.adapters.resolve(LoRARequest(name, 1, path))
                if mine != adapter_id:
                    raise self._diverged(f"adapter {name!r} got id {mine}, rank 0 {adapter_id}")
            elif kind == "unregister":
                names = {i: n for n, i in self.adapters._ids.items()}
                self.adapters.unload(names[op[1]])
            elif kind == "prefetch":
                cache.prefetch(op[1])
                settle(cache)
            elif kind == "prefetch_host":
                cache.prefetch_host(op[1])
            elif kind == "set_demand":
                cache.set_demand(op[1])
                settle(cache)
            elif kind == "touch":
                cache.touch(op[1])
            elif kind == "note_request":
                cache.note_request(op[1])
            elif kind == "acquire":
                slot = cache.acquire(op[1])
                if slot != op[2]:
                    raise self._diverged(f"adapter {op[1]} pinned in slot {slot}, rank 0 {op[2]}")
            elif kind == "release":
                cache.release(op[1])
            else:
                raise ValueError(f"unknown replay op {kind!r}")

    def check_slots(self, slots: dict[int, int]) -> None:
        for adapter_id, slot in slots.items():
            mine = self.adapters.cache.slot_of(adapter_id)
            if mine != slot:
                raise self._diverged(f"adapter {adapter_id} is in slot {mine}, rank 0 {slot}")
