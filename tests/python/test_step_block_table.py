"""The device block tables (engine/block_table.py) and KV frees behind a running step
(KVManager.fence), on the CPU with real pools and sequences.

Block tables: over random steps (sequences gaining blocks, finishing, being preempted and coming
back, more sequences than rows, blocks past the primary width), every step sequence's row must
hold exactly its pages, each step must write only the blocks gained since the sequence last ran,
and the padding row must stay zero. Fences: pages freed while a step may run go back to the pool
only once it is done, in order; an allocation that needs them waits for it.
"""

from __future__ import annotations

import random

import pytest
import torch
from moelora import _C
from moelora.engine.block_table import BlockTable
from moelora.engine.kv_manager import KVManager
from moelora.engine.request import Sequence
from moelora.engine.sampling_params import SamplingParams

LAYERS = 3


def _sequence(seq_id: int) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=str(seq_id), index=0, prompt_token_ids=[1],
                    params=SamplingParams(), adapter_id=None, arrival_time=0.0)


def _apply(table: BlockTable, writes) -> int:
    arrays = [torch.from_numpy(a) for a in writes.arrays()]
    table.apply(*arrays)
    return arrays[0].numel() + arrays[2].numel()


def test_rows_hold_each_sequences_pages_and_steps_write_only_new_blocks():
    rng = random.Random(0)
    table = BlockTable(LAYERS, rows=4, width=5, device=torch.device("cpu"))
    seqs = {i: _sequence(i) for i in range(9)}
    synced: dict[int, int] = {}  # blocks each sequence had when it last ran, same page list
    lists: dict[int, list] = {}
    next_page = 1
    for _ in range(300):
        for seq in seqs.values():  # some gain blocks, some lose their pages (finish, preempt)
            roll = rng.random()
            if roll < 0.05:
                seq.block_pages = []
            elif roll < 0.4:
                for _ in range(rng.randint(1, 3)):
                    seq.block_pages.append(list(range(next_page, next_page + LAYERS)))
                    next_page += LAYERS
        running = [s for s in seqs.values() if s.block_pages]
        step = rng.sample(running, min(len(running), rng.randint(1, 6)))
        rows, writes = table.collect(step)
        assert len(set(rows)) == len(rows) and table.padding_row not in rows
        written = _apply(table, writes)
        expected = 0
        for seq in step:
            same = lists.get(seq.seq_id) is seq.block_pages
            expected += (len(seq.block_pages) - (synced[seq.seq_id] if same else 0)) * LAYERS
            synced[seq.seq_id], lists[seq.seq_id] = len(seq.block_pages), seq.block_pages
        assert written == expected  # the delta, nothing else
        width = max(len(s.block_pages) for s in step)
        view = table.view(width)
        for seq, row in zip(step, rows):
            pages = torch.tensor(seq.block_pages, dtype=torch.int32).t()  # [layers, blocks]
            assert torch.equal(view[:, row, :len(seq.block_pages)], pages)
        assert not table.view(width)[:, table.padding_row].any()
    assert table.rows > 4 and table.generation > 0  # more sequences ran at once than rows
    assert table.overflow is not None  # and some had more blocks than the primary width


def test_flat_indices_stay_within_int32():
    with pytest.raises(ValueError, match="2\\*\\*31"):
        BlockTable(64, rows=1 << 16, width=1 << 10, device=torch.device("meta"))


class _Fence:
    """A step the test finishes by hand."""

    def __init__(self):
        self.finished = False
        self.waited = 0

    def done(self) -> bool:
        return self.finished

    def wait(self) -> None:
        self.waited += 1
        self.finished = True


def _kv(pages: int, layers: int = 2) -> KVManager:
    return KVManager(_C.PagePool(pages * 256, 256), layers, block_tokens=4,
                     sliding_windows=(8, None))


def test_frees_wait_for_the_step_in_flight():
    kv = _kv(16)
    a, b = _sequence(1), _sequence(2)
    assert kv.reserve(a, 16) and kv.reserve(b, 8)  # 4 + 2 blocks of 2 layers
    assert kv.pool.free_pages_count() == 4
    fence = kv.fence = _Fence()
    a.num_computed_tokens = 16
    assert kv.release_behind_window(a) == 2  # layer 0's pages of blocks 0 and 1, queued
    kv.free(b)
    assert kv.pool.free_pages_count() == 4 and kv.deferred_frees == 2
    assert b.block_pages == [] and b.kv_owner is None
    assert kv.reserve(b, 4)  # b comes back: a fresh owner, its old pages still held
    assert kv.pool.free_pages_count() == 2 and kv.deferred_frees == 2
    fence.finished = True
    kv.settle()
    assert kv.pool.free_pages_count() == 2 + 2 + 4 and kv.deferred_frees == 0
    kv.pool.check_invariants()
    kv.free(a)
    kv.free(b)
    assert kv.pool.free_pages_count() == 16


def test_an_allocation_that_needs_queued_pages_waits_for_their_step():
    kv = _kv(8)
    a, b = _sequence(1), _sequence(2)
    assert kv.reserve(a, 16)  # the whole pool
    fence = kv.fence = _Fence()
    kv.free(a)
    assert kv.pool.free_pages_count() == 0
    assert kv.reserve(b, 8) and fence.waited == 1
    assert kv.pool.free_pages_count() == 4 and kv.fence is None
