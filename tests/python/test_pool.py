"""The page pool, arenas and row layouts through the Python API."""

from __future__ import annotations

import sys
import threading

import moelora
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from moelora import _C

KV, ADAPTER = _C.OwnerKind.kv, _C.OwnerKind.adapter


def make_pool(pages: int, page_bytes: int = 256) -> _C.PagePool:
    return _C.PagePool(pages * page_bytes, page_bytes)


def test_allocate_free_and_properties():
    pool = make_pool(13, 512)
    assert (pool.num_pages, pool.page_bytes, pool.device, pool.device_index) == (13, 512, "cpu", 0)
    assert pool.arena_ptr % 4096 == 0
    out = pool.try_allocate("kv", 7, 5)
    assert out and out.ok and len(out.pages) == 5 and out.evicted == [] and out.shortfall == 0
    assert pool.page_address(out.pages[2]) == pool.arena_ptr + out.pages[2] * 512
    pages = pool.allocate(ADAPTER, 7, 3)  # same id, other kind: another owner
    assert set(pages).isdisjoint(out.pages)
    assert pool.pages_of("kv", 7) == out.pages and pool.pages_of(ADAPTER, 7) == pages
    assert pool.free_pages_count() == 5
    pool.free_pages("kv", 7, [out.pages[0]])
    assert pool.free_pages_count() == 6
    pool.free("kv", 7)
    assert not pool.contains("kv", 7) and pool.contains("adapter", 7)
    pool.check_invariants()


def test_exhaustion_is_typed_and_never_partial():
    pool = make_pool(4)
    pool.allocate("kv", 1, 3)
    out = pool.try_allocate("kv", 2, 2)
    assert not out and out.shortfall == 1 and out.pages == []
    assert not pool.contains("kv", 2)
    with pytest.raises(moelora.PoolExhausted, match="kv 2"):
        pool.allocate("kv", 2, 2)
    assert issubclass(moelora.PoolExhausted, moelora.MoeloraError)
    assert pool.free_pages_count() == 1


def test_argument_errors():
    pool = make_pool(4)
    pages = pool.allocate("kv", 1, 2)
    with pytest.raises(moelora.InvalidArgument):
        pool.free_pages("kv", 2, pages)  # not its pages
    with pytest.raises(moelora.InvalidArgument):
        pool.free_pages("kv", 1, [pages[0], 3])
    assert pool.pages_of("kv", 1) == pages
    with pytest.raises(moelora.InvalidArgument):
        pool.unpin("adapter", 1)
    with pytest.raises(moelora.InvalidArgument):
        pool.pin("kv", 1)
    with pytest.raises(moelora.InvalidArgument, match="owner kind"):
        pool.allocate("lora", 1, 1)
    with pytest.raises(moelora.InvalidArgument):
        pool.allocate("kv", 1, -1)
    with pytest.raises(moelora.InvalidArgument):
        pool.set_used_bytes("kv", 1, 2 * 256 + 1)
    with pytest.raises(moelora.NotFound):
        pool.set_used_bytes("kv", 9, 1)
    with pytest.raises(moelora.InvalidArgument, match="multiple of 256"):
        _C.PagePool(4096, 100)
    with pytest.raises(moelora.InvalidArgument, match="device"):
        _C.PagePool(4096, 256, device="tpu")
    if not moelora.cuda_available():
        with pytest.raises(moelora.CudaError):
            _C.PagePool(4096, 256, device="cuda")


def test_eviction_lru_pins_and_listeners():
    pool = make_pool(8)
    for adapter in (1, 2, 3, 4):
        pool.allocate("adapter", adapter, 2)
    pool.touch("adapter", 1)
    pool.pin("adapter", 2)
    pool.pin("adapter", 2)
    pool.unpin("adapter", 2)
    assert pool.is_pinned("adapter", 2)
    heard = []

    def listener(kind, adapter_id):
        heard.append((kind, adapter_id))
        assert not pool.contains(kind, adapter_id)  # calling back into the pool is fine
        pool.check_invariants()

    pool.add_eviction_listener(listener)
    out = pool.try_allocate("kv", 1, 3, evict=True)
    assert out.ok and out.evicted == [(ADAPTER, 3), (ADAPTER, 4)]
    assert heard == out.evicted
    assert pool.stats()["evictions"] == 2 and pool.stats()["pinned_adapter_pages"] == 2
    out = pool.try_allocate("kv", 2, 4, evict=True)  # 1 free + adapter 1; adapter 2 is pinned
    assert not out.ok and out.shortfall == 1 and out.evicted == []
    assert len(heard) == 2


def test_failing_listener_does_not_undo_the_allocation(monkeypatch):
    pool = make_pool(2)
    pool.allocate("adapter", 1, 2)
    pool.add_eviction_listener(lambda kind, adapter_id: 1 / 0)
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    out = pool.try_allocate("kv", 1, 1, evict=True)
    assert out.ok and pool.pages_of("kv", 1) == out.pages
    assert len(reported) == 1 and reported[0].exc_type is ZeroDivisionError


def test_stats_waste():
    pool = make_pool(10, 1024)
    pool.allocate("kv", 1, 2)
    pool.set_used_bytes("kv", 1, 1500)
    pool.allocate("adapter", 1, 3)
    pool.set_used_bytes("adapter", 1, 3000)
    s = pool.stats()
    assert s["used_bytes"] == 4500 and s["waste_bytes"] == 5 * 1024 - 4500
    assert (s["kv_pages"], s["adapter_pages"], s["free_pages"]) == (2, 3, 5)
    assert (s["kv_owners"], s["adapter_owners"], s["total_pages"]) == (1, 1, 10)


def test_external_pool_over_a_torch_tensor():
    memory = torch.zeros(8 * 1024, dtype=torch.uint8)
    pool = _C.PagePool.from_external(
        memory.data_ptr(), memory.numel(), 2048, "cpu", 0, keep_alive=memory
    )
    assert pool.arena_ptr == memory.data_ptr() and pool.num_pages == 4
    (page,) = pool.allocate("kv", 1, 1)
    start = pool.page_address(page) - memory.data_ptr()
    memory[start : start + 2048] = 7  # the page is the tensor's memory
    assert int(memory.sum()) == 7 * 2048
    del memory
    pool.check_invariants()


def test_threads_contend_without_breaking_invariants():
    pool = make_pool(48)
    errors = []

    def worker(thread_index: int):
        try:
            for step in range(2000):
                request = thread_index * 100 + step % 5
                adapter = step % 7
                pool.try_allocate("kv", request, 1 + step % 3, evict=True)
                if step % 4 == 0:
                    pool.free("kv", request)
                pool.pin("adapter", adapter)
                pool.try_allocate("adapter", adapter, 1, evict=True)
                pool.unpin("adapter", adapter)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    pool.check_invariants()
    for t in range(4):
        for k in range(5):
            pool.free("kv", t * 100 + k)
    for adapter in range(7):
        assert not pool.is_pinned("adapter", adapter)
        pool.free("adapter", adapter)
    assert pool.free_pages_count() == pool.num_pages


def test_row_layouts():
    sites = [
        _C.LoraSite(name="q_proj", num_layers=2, in_dim=111, out_dim=111),
        _C.LoraSite(name="experts.down", num_layers=2, num_experts=5, in_dim=133, out_dim=111),
    ]
    sites[0].out_dim = 96  # fields are writable
    assert "q_proj" in repr(sites[0])
    assert _C.lora_row_bytes(111, torch.bfloat16) == 224 == _C.lora_row_bytes(111, "BF16")
    small = _C.AdapterRowLayout(sites, [[8, 8], [8, 0]], torch.bfloat16, 4096, 64)
    large = _C.AdapterRowLayout(sites, [[64, 64], [64, 0]], "bfloat16", 4096, 64)
    assert large.used_bytes == 8 * small.used_bytes
    offsets = small.layer_row_offsets(1, 0, 5)
    assert len(offsets) == 5 * 2 * 8 and offsets[0] == small.row_offset(1, 0, 0, False, 0)
    assert all(offset % 16 == 0 for offset in offsets)
    assert all(offset // 4096 == (offset + 224 - 1) // 4096 for offset in offsets)
    with pytest.raises(moelora.InvalidArgument):
        _C.AdapterRowLayout(sites, [[65, 8], [8, 0]], "bfloat16", 4096, 64)
    table = _C.RowTableLayout(sites, 64)
    assert table.entries_per_slot == 2 * 2 * 64 + 2 * 5 * 2 * 64
    assert table.rank_entries_per_slot == 4 and table.rank_index(1, 1) == 3
    assert table.row_index(1, 1, 4, True, 63) == table.entries_per_slot - 1
    assert table.site_index("experts.down") == 1 and table.row_base(1, 0) == 256
    with pytest.raises(moelora.NotFound):
        table.site_index("v_proj")


class PoolMachine(RuleBasedStateMachine):
    """Random operation sequences against a plain-Python model of the pool."""

    def __init__(self):
        super().__init__()
        self.pool = make_pool(12)
        self.pages: dict[tuple, set] = {}  # (kind name, id) -> pages
        self.pins: dict[int, int] = {}
        self.recency: list[int] = []  # adapters, least recently used first
        self.evictions = 0

    def _use(self, adapter):
        if adapter in self.recency:
            self.recency.remove(adapter)
        self.recency.append(adapter)

    def _forget(self, owner):
        self.pages.pop(owner, None)
        if owner[0] == "adapter":
            self.pins.pop(owner[1], None)
            if owner[1] in self.recency:
                self.recency.remove(owner[1])

    owners = st.tuples(st.sampled_from(["kv", "adapter"]), st.integers(0, 4))

    @rule(owner=owners, n=st.integers(0, 6), evict=st.booleans())
    def allocate(self, owner, n, evict):
        reachable = self.pool.num_pages - sum(len(p) for p in self.pages.values())
        victims = []
        for adapter in self.recency if evict and reachable < n else []:
            pages = self.pages.get(("adapter", adapter), set())
            if reachable >= n:
                break
            if self.pins.get(adapter, 0) or not pages or owner == ("adapter", adapter):
                continue
            reachable += len(pages)
            victims.append((ADAPTER, adapter))
        out = self.pool.try_allocate(*owner, n, evict=evict)
        if reachable < n:
            assert not out.ok and out.shortfall == n - reachable and out.evicted == []
            return
        assert out.ok and out.evicted == victims and len(out.pages) == n
        for _, adapter in victims:
            self._forget(("adapter", adapter))
        self.evictions += len(victims)
        taken = set().union(*self.pages.values()) if self.pages else set()
        assert taken.isdisjoint(out.pages)
        self.pages.setdefault(owner, set()).update(out.pages)
        if owner[0] == "adapter":
            self.pins.setdefault(owner[1], 0)
            self._use(owner[1])

    @rule(owner=owners)
    def free(self, owner):
        self.pool.free(*owner)
        self._forget(owner)

    @precondition(lambda self: any(self.pages.values()))
    @rule(data=st.data())
    def free_some_pages(self, data):
        owner = data.draw(st.sampled_from(sorted(o for o, p in self.pages.items() if p)))
        chosen = data.draw(st.sets(st.sampled_from(sorted(self.pages[owner])), min_size=1))
        self.pool.free_pages(*owner, sorted(chosen))
        self.pages[owner] -= chosen

    @rule(adapter=st.integers(0, 4))
    def pin(self, adapter):
        self.pool.pin("adapter", adapter)
        self.pins[adapter] = self.pins.get(adapter, 0) + 1
        self.pages.setdefault(("adapter", adapter), set())
        self._use(adapter)

    @rule(adapter=st.integers(0, 4))
    def unpin(self, adapter):
        if self.pins.get(adapter, 0) == 0:
            with pytest.raises(moelora.InvalidArgument):
                self.pool.unpin("adapter", adapter)
            return
        self.pool.unpin("adapter", adapter)
        self.pins[adapter] -= 1
        self._use(adapter)

    @rule(adapter=st.integers(0, 4))
    def touch(self, adapter):
        self.pool.touch("adapter", adapter)
        if ("adapter", adapter) in self.pages:
            self._use(adapter)

    @invariant()
    def matches_model(self):
        self.pool.check_invariants()
        for owner, pages in self.pages.items():
            assert set(self.pool.pages_of(*owner)) == pages
        stats = self.pool.stats()
        assert stats["kv_owners"] + stats["adapter_owners"] == len(self.pages)
        assert stats["free_pages"] == self.pool.num_pages - sum(map(len, self.pages.values()))
        assert stats["evictions"] == self.evictions
        pinned = sum(len(p) for (k, i), p in self.pages.items() if k == "adapter" and self.pins[i])
        assert stats["pinned_adapter_pages"] == pinned

    def teardown(self):
        for owner in list(self.pages):
            self.pool.free(*owner)
        assert self.pool.free_pages_count() == self.pool.num_pages


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
