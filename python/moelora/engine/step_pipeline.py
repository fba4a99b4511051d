"""Async scheduling: the next step is scheduled and launched while the GPU runs the current one.

Each engine step (StepPipeline.step):
  1. schedules step N+1 while step N still runs: every sequence of step N counts its sampled
     token as pending (Sequence.num_pending_tokens), so the scheduler plans N+1 as if the token
     were known; sequences whose pending token is their last (max_tokens, the model's length)
     are left out;
  2. launches N+1: the host packs and sends its inputs, the ids of pending tokens are taken on
     the device from step N's sampled tokens, then the forward pass and sampling are queued, and
     the sampled tokens' copy to pinned host memory with an event after them;
  3. only then waits for step N's tokens and appends them (stop checks, detokenisation), so all
     that host work overlaps the GPU's work on N+1. Step N's outputs are returned one call later
     than a synchronous engine would.

A sequence that stops on step N's token (EOS, a stop string) has already been put into N+1; its
token from N+1 is dropped. Nothing N+1 may still touch goes back while it runs: freed KV pages
wait behind N+1's fence (KVManager.fence), and N+1 holds a pin on each adapter it reads.

The host falls back to one step at a time (waits for N before scheduling) when a sequence of N
samples with penalties or logit bias (they need their own latest token on the host); the tokens,
text and stop behaviour are those of the synchronous engine either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from moelora.engine.device_sampler import DeviceSampleRequest, SampledTokens, sample_on_device
from moelora.engine.request import Sequence, SequenceStatus, now
from moelora.engine.scheduler import ScheduledBatch

logger = logging.getLogger("moelora")

def async_scheduling_enabled(config, device: torch.device, one_process: bool) -> bool:
    """EngineConfig.async_scheduling, where None means on for a one-process CUDA engine and off
    elsewhere (on a CPU every launch runs to completion, so there is nothing to overlap). A
    parallel engine's ranks run every step in lock-step, so it never schedules ahead."""
    if not one_process:
        return False
    choice = config.async_scheduling
    return bool(choice) if choice is not None else device.type == "cuda"


class _Fence:
    """A launched step, as KVManager.fence: done once its sampled tokens reached the host."""

    def __init__(self, sampled: SampledTokens):
        self._sampled = sampled

    def done(self) -> bool:
        return self._sampled.done()

    def wait(self) -> None:
        self._sampled.wait()


@dataclass
class _InFlight:
    batch: ScheduledBatch
    sampling: list[Sequence]  # the sequences that sample, in the order of `sampled`
    sampled: SampledTokens
    pinned_adapters: list[int] = field(default_factory=list)

    def row_of(self) -> dict[int, int]:
        return {seq.seq_id: row for row, seq in enumerate(self.sampling)}


class StepPipeline:
    """The engine's step with one step in flight. Holds no reference to the engine (it is
    handed in), so an engine dropped by its owner is freed by reference counting alone."""

    def __init__(self):
        self.in_flight: _InFlight | None = None

    def busy(self) -> bool:
        return self.in_flight is not None

    def step(self, engine) -> list:
        touched: set[str] = set()
        if self.in_flight is not None and self._needs_host_tokens(self.in_flight):
            self.drain(engine, touched)
        batch = engine.scheduler.schedule()
        for seq in batch.failed:
            engine.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
            seq.finish_time = now()
            touched.add(seq.request_id)
        engine.stats["preemptions"] += len(batch.preempted)
        self._leave_out_last_tokens(engine, batch)
        if batch.is_empty():
            if self.in_flight is not None:
                self.drain(engine, touched)
            elif engine.scheduler.has_work() and not touched:
                engine.adapters.wait_for_progress()
            return engine._outputs(touched)
        previous = self.in_flight
        try:
            self.in_flight = self._launch(engine, batch, previous)
        except Exception as error:  # noqa: BLE001 - confined to the step's own sequences
            self.in_flight = None
            engine._fail_batch(batch, error, touched)
        if previous is not None:
            self._finish(engine, previous, touched)
        if self.in_flight is not None and all(s.finished for s in self.in_flight.batch.seqs):
            self.drain(engine, touched)  # only dropped tokens left: nothing to wait for later
        return engine._outputs(touched)

    def drain(self, engine, touched: set[str]) -> None:
        """Waits for the step in flight and appends its tokens."""
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            self._finish(engine, in_flight, touched)
        engine.kv.settle()

    # -- launching ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _launch(self, engine, batch: ScheduledBatch, previous: _InFlight | None) -> _InFlight:
        runner = engine.runner
        slot_of = engine.adapters.slots_for(batch.seqs)
        sampling = [seq for seq, num_new in zip(batch.seqs, batch.num_new_tokens)
                    if seq.num_computed_tokens + num_new == seq.num_tokens]
        prepared = runner.prepare(batch, slot_of,
                                  previous.row_of() if previous is not None else None)
        hidden = runner.forward(prepared, previous.sampled.tokens if previous else None)
        requests = [DeviceSampleRequest(seq.params, seq.generator, engine.eos_token_ids,
                                        len(seq.output_token_ids) + seq.num_pending_tokens,
                                        seq.prompt_token_ids, seq.output_token_ids)
                    for seq in sampling]
        sampled = sample_on_device(runner.logits(hidden), requests)
        launched = _InFlight(batch, sampling, sampled)
        engine.kv.fence = _Fence(sampled)  # pages freed from now on wait for this step
        for adapter_id in {s.adapter_id for s in batch.seqs if s.adapter_id is not None}:
            if engine.adapters.pin(adapter_id):
                launched.pinned_adapters.append(adapter_id)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            if len(seq.output_token_ids) == 0 and seq.num_pending_tokens == 0:
                engine.stats["prompt_tokens"] += num_new
            seq.num_computed_tokens += num_new
            engine.stats["window_pages_released"] += engine.kv.release_behind_window(seq)
            engine.kv.publish_computed(seq)
        for seq in sampling:
            seq.num_pending_tokens += 1
        engine.stats["steps"] += 1
        if previous is not None:  # launched before the previous step's tokens were waited for
            engine.stats["overlapped_steps"] = engine.stats.get("overlapped_steps", 0) + 1
        engine._record_prefix_cache_stats()
        return launched

    def _leave_out_last_tokens(self, engine, batch: ScheduledBatch) -> None:
        """Drops from the batch the sequences whose pending token ends them by length."""
        keep = [(seq, num_new) for seq, num_new in zip(batch.seqs, batch.num_new_tokens)
                if not (seq.num_pending_tokens and _last_token_pending(engine, seq))]
        if len(keep) < len(batch.seqs):
            batch.seqs = [seq for seq, _ in keep]
            batch.num_new_tokens = [num_new for _, num_new in keep]

    @staticmethod
    def _needs_host_tokens(in_flight: _InFlight) -> bool:
        return any(seq.params.adjusts_logits for seq in in_flight.sampling if not seq.finished)

    # -- finishing ---------------------------------------------------------------------------
    def _finish(self, engine, step: _InFlight, touched: set[str]) -> None:
        try:
            tokens, logprobs, tops = step.sampled.result()
        except Exception as error:  # noqa: BLE001 - the step's own sequences fail
            self._unpin(engine, step)
            engine._fail_batch(step.batch, error, touched)
            return
        for seq, token, logprob, top in zip(step.sampling, tokens, logprobs, tops):
            if seq.finished:
                continue  # stopped, aborted or failed after this step was launched
            seq.num_pending_tokens -= 1
            engine._append_token(seq, token, logprob, top)
            touched.add(seq.request_id)
        self._unpin(engine, step)

    @staticmethod
    def _unpin(engine, step: _InFlight) -> None:
        for adapter_id in step.pinned_adapters:
            engine.adapters.unpin(adapter_id)
        step.pinned_adapters = []


def _last_token_pending(engine, seq: Sequence) -> bool:
    generated = len(seq.output_token_ids) + seq.num_pending_tokens
    return generated >= seq.max_tokens or seq.num_tokens >= engine.max_model_len
