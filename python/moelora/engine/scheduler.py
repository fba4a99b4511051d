"""Continuous batching with chunked prefill, adapter-aware admission and preemption.

A request's adapter starts loading the moment the request is queued (add), so the load
overlaps the steps of everything ahead of it: onto the device when the adapter is among the first
`prefetch_lookahead` distinct adapters queued (it joins the demand order at once, so a burst of
arrivals loads in queue order and never evicts what the head of the queue waits for), else into
host memory only, until the queue ahead of it drains. Each step:
  1. running sequences keep running: decodes take one token each, unfinished prefills take a
     chunk; when KV pages run out the youngest running sequence is preempted (its pages freed,
     recomputed later from its tokens), so no request fails for memory that will come back;
  2. the adapters waiting sequences need are given to the adapter cache in queue order (their
     loads start in that order, and one wanted sooner is never evicted for one wanted later);
  3. waiting sequences are admitted in arrival order while the token budget, the sequence cap
     and the distinct-adapter cap allow; one whose adapter is not resident yet is passed over
     (never waited for), and joins on the first step its adapter is resident;
  4. fairness (aging): a sequence that could not get its adapter a slot or pages for
     `starvation_steps` steps while every slot is taken goes first in the cache's queue and
     stops the admission of sequences behind it that use other adapters, so running ones
     release their slots to it. Steps its adapter spends loading do not count.
A structured-output sequence is admitted once its grammar is compiled (engine/grammar.py compiles
on its own threads); one whose grammar failed to compile fails here, alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moelora.engine.kv_manager import KVManager
from moelora.engine.request import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_loras_per_batch: int = 8
    prefetch_lookahead: int = 64  # distinct adapters of waiting sequences given to the cache
    max_resident_adapters: int = 8  # device slots (max_loras)
    starvation_steps: int = 64

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_loras_per_batch",
                     "prefetch_lookahead", "max_resident_adapters", "starvation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVManager, adapters):
        self.config = config
        self.kv = kv
        # AdapterManager: request_arrived / set_demand / ready / failure / pin / unpin
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # steps that ran short of max_num_seqs while queued sequences waited for their adapters
        self.num_short_for_adapters = 0
        # non-empty batches scheduled so far: the step numbering of waiting_for_room_since
        self.batches_scheduled = 0
        self._waited_steps: dict[int, int] = {}
        self._waiting_since: dict[int, int] = {}  # seq_id -> batch of its first counted wait
        self._starving: int | None = None  # adapter of the sequence that starved last step
        self._demand: list[int] = []  # the demand order last given to the adapter cache
        self._demanded: set[int] = set()

    # -- queue management -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        if seq.adapter_id is None:
            return
        adapter_id = seq.adapter_id
        joins = (adapter_id in self._demanded
                 or len(self._demand) < self.config.prefetch_lookahead)
        self.adapters.request_arrived(adapter_id, to_device=joins)  # its load starts now
        if joins and adapter_id not in self._demanded:
            # Into the demand order at once, behind every adapter queued ahead of it.
            self._demand.append(adapter_id)
            self._demanded.add(adapter_id)
            self.adapters.set_demand(self._demand)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Frees everything a sequence holds; it leaves the queues."""
        seq.status = status
        self.kv.free(seq)
        self._unpin(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._forget_waits(seq)

    def waiting_for_room_since(self, seq: Sequence) -> int | None:
        """batches_scheduled as it stood when seq first could not get a slot, pages or a place
        under the distinct-adapter cap: the step its count towards starvation_steps starts at.
        None if it has not waited for room, or once it runs."""
        return self._waiting_since.get(seq.seq_id)

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        self._fail_sequences_of_failed_adapters(batch)
        self._fail_sequences_of_failed_grammars(batch)

        # 1. running sequences, oldest first; preempt the youngest when pages run out.
        for seq in sorted(self.running, key=lambda s: s.arrival_time):
            if seq not in self.running or budget <= 0:
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve_or_preempt(seq, seq.num_computed_tokens + num_new, batch):
                continue
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

        # 2. admit waiting sequences. Cached prefix blocks give way to adapters waiting for
        # pages (the native cache only evicts idle adapters to make room).
        if self.kv.prefix_cache is not None and self.adapters.waiting_for_memory():
            self.kv.evict_cached_blocks()
        self._publish_demand()
        adapters_in_batch = {s.adapter_id for s in self.running if s.adapter_id is not None}
        starving: int | None = None  # adapter of a starving sequence: admit no other adapter
        waited_for_a_load = False
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if starving is not None and seq.adapter_id not in (None, starving):
                continue
            if seq.grammar is not None and not seq.grammar.compiled():
                continue  # compiling (or failed since the check above: next step fails it)
            if seq.adapter_id is not None and (self.kv.pages_for(seq.num_tokens)
                                               + self.adapters.num_pages(seq.adapter_id)
                                               > self.kv.pool.num_pages):
                self.waiting.remove(seq)
                seq.error = (f"request needs {self.kv.pages_for(seq.num_tokens)} pages of KV "
                             f"cache beside its adapter's "
                             f"{self.adapters.num_pages(seq.adapter_id)}, more than the whole "
                             f"page pool holds ({self.kv.pool.num_pages} pages)")
                seq.error_type = "invalid_request"
                batch.failed.append(seq)
                continue
            if seq.adapter_id is not None:
                if not self._admit_adapter(seq, adapters_in_batch):
                    waited_for_a_load = waited_for_a_load or not self.adapters.ready(seq.adapter_id)
                    # Still starving in the step its adapter's slot comes free: until the cache
                    # has moved it in, the slot would otherwise go back to the others' queue.
                    if (self._blocked_by_memory(seq, adapters_in_batch) and self._note_wait(seq)
                            and starving is None
                            and (self._slots_taken() or seq.adapter_id == self._starving)):
                        starving = seq.adapter_id
                    continue
                seq.pinned_adapter = True
            if self.kv.pages_for(seq.num_tokens) > self.kv.pool.num_pages:
                self._unpin(seq)
                self.waiting.remove(seq)
                seq.error = (f"request needs {seq.num_tokens} tokens of KV cache, more than the "
                             f"whole page pool holds ({self.kv.capacity_tokens()} tokens)")
                seq.error_type = "invalid_request"
                batch.failed.append(seq)
                continue
            cached = self.kv.attach_cached_prefix(seq)  # prefix caching: skip cached blocks
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.reserve(seq, seq.num_computed_tokens + num_new):
                self.kv.free(seq)  # the cached blocks it took, if any
                seq.num_computed_tokens = 0
                self._unpin(seq)
                self._note_wait(seq)
                break  # memory is short: admitting later arrivals would starve this one
            if self.kv.prefix_cache is not None:
                self.kv.prefix_cache.record_lookup(len(seq.prompt_token_ids), cached)
            self.waiting.remove(seq)
            self._forget_waits(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.adapter_id is not None:
                adapters_in_batch.add(seq.adapter_id)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self._starving = starving
        if waited_for_a_load and len(self.running) < self.config.max_num_seqs:
            self.num_short_for_adapters += 1
        if not batch.is_empty():
            self.batches_scheduled += 1
        return batch

    # -- helpers -----------------------------------------------------------------------------
    def _admit_adapter(self, seq: Sequence, adapters_in_batch: set[int]) -> bool:
        """True (and the adapter pinned) when seq's adapter may join this step: within the
        distinct-adapter cap and resident on the device."""
        new_adapter = seq.adapter_id not in adapters_in_batch
        if new_adapter and len(adapters_in_batch) >= self.config.max_loras_per_batch:
            return False
        return self.adapters.ready(seq.adapter_id) and self.adapters.pin(seq.adapter_id)

    def _reserve_or_preempt(self, seq: Sequence, total_tokens: int, batch: ScheduledBatch) -> bool:
        while not self.kv.reserve(seq, total_tokens):
            victim = max((s for s in self.running if s not in batch.seqs), default=None,
                         key=lambda s: s.arrival_time)
            if victim is None or victim.arrival_time < seq.arrival_time:
                victim = seq  # nothing younger to take pages from: wait ourselves
            self._preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.kv.free(seq)
        self._unpin(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def _unpin(self, seq: Sequence) -> None:
        if seq.pinned_adapter:
            self.adapters.unpin(seq.adapter_id)
            seq.pinned_adapter = False

    def _note_wait(self, seq: Sequence) -> bool:
        """Counts a step this sequence could not run; True once it is starving."""
        waited = self._waited_steps.get(seq.seq_id, 0) + 1
        self._waited_steps[seq.seq_id] = waited
        self._waiting_since.setdefault(seq.seq_id, self.batches_scheduled)
        return waited >= self.config.starvation_steps

    def _forget_waits(self, seq: Sequence) -> None:
        self._waited_steps.pop(seq.seq_id, None)
        self._waiting_since.pop(seq.seq_id, None)

    def _blocked_by_memory(self, seq: Sequence, adapters_in_batch: set[int]) -> bool:
        """Whether seq waits for room (a slot, pages, or a place under the distinct-adapter
        cap) rather than for its adapter's load to finish."""
        if seq.adapter_id in adapters_in_batch:
            return False
        if self.adapters.ready(seq.adapter_id):
            return True  # resident: the per-batch adapter cap holds it back
        return self.adapters.waiting_for_slot(seq.adapter_id)

    def _slots_taken(self) -> bool:
        in_use = {s.adapter_id for s in self.running if s.adapter_id is not None}
        return len(in_use) >= min(self.config.max_resident_adapters,
                                  self.config.max_loras_per_batch)

    def _publish_demand(self) -> None:
        """Tells the adapter cache which adapters waiting sequences need, in queue order (a
        starving sequence's first): loads start in that order, and a resident adapter that a
        sequence further ahead needs is not evicted for one further back."""
        order: list[int] = []
        seen: set[int] = set()
        if self._starving is not None:
            order.append(self._starving)
            seen.add(self._starving)
        for seq in self.waiting:
            if len(order) >= self.config.prefetch_lookahead:
                break
            if seq.adapter_id is not None and seq.adapter_id not in seen:
                seen.add(seq.adapter_id)
                order.append(seq.adapter_id)
        self._demand, self._demanded = order, seen
        self.adapters.set_demand(order)

    def _fail_sequences_of_failed_adapters(self, batch: ScheduledBatch) -> None:
        for seq in list(self.waiting):
            if seq.adapter_id is None:
                continue
            problem = self.adapters.failure(seq.adapter_id)
            if problem is not None:
                self.waiting.remove(seq)
                seq.error = problem
                seq.error_type = "adapter_error"
                batch.failed.append(seq)

    def _fail_sequences_of_failed_grammars(self, batch: ScheduledBatch) -> None:
        for seq in list(self.waiting):
            problem = seq.grammar.failure() if seq.grammar is not None else None
            if problem is not None:
                self.waiting.remove(seq)
                seq.error = problem
                seq.error_type = "invalid_request"
                batch.failed.append(seq)
