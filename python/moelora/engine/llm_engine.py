"""LLMEngine: requests in, tokens out. Owns the requests, the scheduler, the KV manager and the
sampler; its executor (engine/executor.py) owns the model, the unified page pool, the adapter
cache and the model runner, in this process or in one process per GPU. `step()` runs one batch.

Requests are checked in full when they are added (prepare_request), so a request that can never
run is refused up front with a ValueError, and a step that fails fails only the sequences it
ran. `shutdown()` (or dropping the last reference: the engine holds no reference cycle) frees
the GPU memory, the step graphs and the adapter cache's threads.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from moelora.engine.adapters import LoRARequest
from moelora.engine.config import EngineConfig
from moelora.engine.detokenizer import IncrementalDetokenizer, find_stop
from moelora.engine.executor import Executor, UniProcExecutor
from moelora.engine.grammar import GrammarCompilerPool, mask_logits
from moelora.engine.kv_manager import KVManager
from moelora.engine.prefix_cache import PrefixCache
from moelora.engine.prompt_logprobs import (
    PromptLogprobBatch,
    prompt_logprob_spans,
    request_prompt_logprobs,
)
from moelora.engine.request import (
    CompletionOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
    Sequence,
    SequenceStatus,
    now,
)
from moelora.engine.sampler import SampleRequest, make_generator, sample
from moelora.engine.sampling_params import SamplingParams
from moelora.engine.scheduler import Scheduler, SchedulerConfig
from moelora.engine.step_pipeline import StepPipeline, async_scheduling_enabled
from moelora.engine.tokenizer import check_tokenizer, load_tokenizer

logger = logging.getLogger("moelora")
_UNSET = object()


class _RequestState:
    def __init__(self, request_id, prompt, prompt_ids, params, lora_request, seqs):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_ids
        self.params = params
        self.lora_request = lora_request
        self.seqs: list[Sequence] = seqs


@dataclass
class PreparedRequest:
    """A request that passed every admission check; add_prepared queues it."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None
    adapter_id: int | None
    max_tokens: int
    # the compiled grammar of a structured-output request (a Future, compiled off this thread;
    # a server may wait for it to answer a bad schema before queueing): None without one
    grammar: Future | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        """`executor`: what runs the model, built for this `config`; None: a UniProcExecutor
        (tensor_parallel_size 1). Parallel engines are handed a
        moelora.distributed.MultiProcExecutor(config)."""
        self._closed = False
        if executor is None:
            executor = UniProcExecutor(config)
        elif executor.config is not config:
            raise ValueError("the executor was built for another EngineConfig")
        self.executor = executor  # the engine's from now on: shutdown() shuts it down
        self.config = config
        self.device, self.dtype = executor.device, executor.dtype
        self.model_dir = config.model if os.path.isdir(config.model) else None
        # The driving worker's state, for stats and tests; the executor owns it.
        self.model, self.memory = executor.model, executor.memory
        self.adapters, self.runner = executor.adapters, executor.runner
        try:
            self.tokenizer = load_tokenizer(config.tokenizer or self.model_dir)
            check_tokenizer(self.tokenizer, executor.model.config.vocab_size,
                            config.tokenizer or self.model_dir)
        except BaseException:
            executor.shutdown()  # e.g. the other processes of a parallel engine
            raise
        mc = self.model.config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.eos_token_ids = tuple(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids = tuple(sorted(set(self.eos_token_ids)
                                              | {self.tokenizer.eos_token_id}))
        self.prefix_cache = PrefixCache() if config.enable_prefix_caching else None
        self.kv = KVManager(executor.kv_pool, mc.num_layers, self.memory.block_tokens,
                            mc.sliding_windows, self.prefix_cache)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs,
                            max_num_batched_tokens=config.max_num_batched_tokens,
                            max_loras_per_batch=config.max_loras_per_batch,
                            max_resident_adapters=config.device_lora_slots,
                            # twice the slots: evictions see which idle adapter is wanted last
                            prefetch_lookahead=max(64, 2 * config.device_lora_slots)),
            self.kv, self.adapters)
        self._requests: dict[str, _RequestState] = {}
        self._grammar_pool: GrammarCompilerPool | None = None  # made for the first constraint
        self._grammar_pool_lock = threading.Lock()
        # the longest sequence the pool can ever hold (None: no bound, all layers windowed)
        self._capacity = self.kv.max_tokens_within(self.memory.pool.num_pages)
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.stats = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "preemptions": 0,
                      "window_pages_released": 0}
        # Last attribute on purpose: the instance dict releases its values in order, so when the
        # engine is dropped this marker goes after the model, pool and graphs, and its finalizer
        # hands the memory they held back to the driver.
        self._release_marker = _ReleaseMarker()
        if self.device.type == "cuda":
            release = weakref.finalize(self._release_marker, _return_cached_memory, self.device)
            release.atexit = False  # at exit the process gives everything back anyway

    # -- requests ----------------------------------------------------------------------------
    def next_request_id(self) -> str:
        return str(next(self._request_ids))

    def prepare_request(self, prompt: str | list[int] | dict, params: SamplingParams,
                        lora_request: LoRARequest | None = None) -> PreparedRequest:
        """Every admission check of a request, without queueing it: ValueError (or
        AdapterValidationError, a ValueError) naming what is wrong. Registers the request's
        adapter on first use (that is how an adapter is validated)."""
        self._check_open()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got "  # noqa: TRY004
                             f"{type(params).__name__}")
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest or None, got "
                             f"{type(lora_request).__name__}")
        text, prompt_ids = self._tokenize(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got "
                             f"[{min(prompt_ids)}, {max(prompt_ids)}]")
        params.check_limits(max_logprobs=self.config.max_logprobs, vocab_size=vocab)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer and this model has none: "
                             "stop on token ids with stop_token_ids")
        if params.structured_outputs is not None and self.tokenizer is None:
            raise ValueError(f"structured outputs ({params.structured_outputs.kind}) need a "
                             f"tokenizer and this model has none")
        adapter_id = self.adapters.resolve(lora_request) if lora_request is not None else None
        # The pool's room for one sequence's KV cache. Whether it also fits beside its adapter
        # is the scheduler's to decide (a per-request failure): a request must not be refused
        # for the size of an adapter that the pool holds for other requests anyway.
        capacity = self._capacity
        longest = self.max_model_len if capacity is None else min(self.max_model_len, capacity)
        max_tokens = params.max_tokens if params.max_tokens is not None else \
            longest - len(prompt_ids)
        total = len(prompt_ids) + max(max_tokens, 1)
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) "
                             f"exceeds the model's maximum length ({self.max_model_len})")
        if capacity is not None and total > capacity:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max(max_tokens, 1)}) needs "
                f"{self.kv.min_pages_for(total)} pages of KV cache; the page pool holds "
                f"{self.memory.pool.num_pages} pages, room for at most {capacity} tokens of "
                f"one sequence")
        grammar = None
        if params.structured_outputs is not None:  # checked last: nothing after can refuse it
            grammar = self.grammar_pool().compile(params.structured_outputs)
        return PreparedRequest(text, prompt_ids, params, lora_request, adapter_id, max_tokens,
                               grammar)

    def grammar_pool(self) -> GrammarCompilerPool:
        """The compiler of structured-output constraints (made, and xgrammar imported, on first
        use; ValueError naming `pip install xgrammar` where it is missing). Safe from any thread:
        a server may compile a request's constraint before queueing it, to answer a bad one
        with 400; the engine then finds the same compilation in the pool's cache."""
        with self._grammar_pool_lock:
            if self._grammar_pool is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer and this model has "
                                     "none")
                self._grammar_pool = GrammarCompilerPool(
                    self.tokenizer, self.model.config.vocab_size, self.eos_token_ids)
            return self._grammar_pool

    def add_request(self, request_id: str, prompt: str | list[int] | dict,
                    params: SamplingParams, lora_request: LoRARequest | None = None,
                    arrival_time: float | None = None) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.add_prepared(request_id, self.prepare_request(prompt, params, lora_request),
                          arrival_time)

    def add_prepared(self, request_id: str, prepared: PreparedRequest,
                     arrival_time: float | None = None) -> None:
        """Queues a request that prepare_request accepted."""
        self._check_open()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = prepared.params
        arrival = arrival_time if arrival_time is not None else now()
        seqs = []
        for index in range(params.n):
            seq = Sequence(seq_id=next(self._seq_ids), request_id=request_id, index=index,
                           prompt_token_ids=list(prepared.prompt_token_ids), params=params,
                           adapter_id=prepared.adapter_id, arrival_time=arrival)
            seed = (params.seed if params.seed is not None else
                    self.config.seed * 1_000_003 + seq.seq_id) + index
            seq.generator = None if params.greedy else make_generator(seed, self.device)
            seq.max_tokens = prepared.max_tokens
            if prepared.grammar is not None:
                seq.grammar = self._grammar_pool.state(prepared.grammar)
            seqs.append(seq)
        self._requests[request_id] = _RequestState(request_id, prepared.prompt,
                                                   prepared.prompt_token_ids, params,
                                                   prepared.lora_request, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is None:
            return
        for seq in state.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
                seq.finish_time = now()
        del self._requests[request_id]  # nobody will ask for its output any more

    def has_unfinished_requests(self) -> bool:
        """Whether step() has more to do: requests to run, or a step still in flight."""
        pipeline = self._step_pipeline()
        return self.scheduler.has_work() or (pipeline is not None and pipeline.busy())

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one step and returns the outputs of the requests it advanced. With async
        scheduling (engine/step_pipeline.py) the step is launched and the previous one's tokens
        are returned while it runs."""
        self._check_open()
        pipeline = self._step_pipeline()
        if pipeline is not None:
            return pipeline.step(self)
        batch = self.scheduler.schedule()
        touched: set[str] = set()
        for seq in batch.failed:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
            seq.finish_time = now()
            touched.add(seq.request_id)
        self.stats["preemptions"] += len(batch.preempted)
        if batch.is_empty():
            if self.scheduler.has_work() and not touched:
                self.adapters.wait_for_progress()
            return self._outputs(touched)
        try:
            self._run_batch(batch, touched)
        except Exception as error:  # noqa: BLE001 - confined to the step's own sequences
            self._fail_batch(batch, error, touched)
        return self._outputs(touched)

    def _step_pipeline(self) -> StepPipeline | None:
        """The async-scheduling pipeline (made on first use), or None: steps run one at a
        time."""
        pipeline = self.__dict__.get("_pipeline", _UNSET)
        if pipeline is _UNSET:
            one_process = isinstance(self.executor, UniProcExecutor)
            pipeline = StepPipeline() if async_scheduling_enabled(
                self.config, self.device, one_process) else None
            self._pipeline = pipeline
        return pipeline

    def _outputs(self, touched: set[str]) -> list[RequestOutput]:
        return [self._output(self._requests[r]) for r in touched if r in self._requests]

    def _run_batch(self, batch, touched: set[str]) -> None:
        slot_of = self.adapters.slots_for(batch.seqs)
        spans = prompt_logprob_spans(batch)
        logits = self.executor.execute(batch, slot_of)
        sampling = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            self.stats["window_pages_released"] += self.kv.release_behind_window(seq)
            self.kv.publish_computed(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                sampling.append(seq)
            if len(seq.output_token_ids) == 0:
                self.stats["prompt_tokens"] += num_new
        if spans:
            PromptLogprobBatch(logits[len(sampling):], spans).append(self.tokenizer)
        if sampling:
            logits = logits[:len(sampling)]
            self.mask_grammar_rows(logits, sampling)
            result = sample(logits, [SampleRequest(s.params, s.generator, self.eos_token_ids,
                                                   s.prompt_token_ids, s.output_token_ids)
                                     for s in sampling])
            for i, seq in enumerate(sampling):
                self._append_token(seq, result.token_ids[i], result.logprobs[i],
                                   result.top_logprobs[i])
                touched.add(seq.request_id)
        self.stats["steps"] += 1
        self._record_prefix_cache_stats()

    def mask_grammar_rows(self, logits: torch.Tensor, sampling: list[Sequence]) -> None:
        """Masks, in place, the logits of sampling sequences with a grammar to the tokens it
        allows next; the other rows stay as they are."""
        if self._grammar_pool is not None:
            states = [seq.grammar for seq in sampling]
            if any(state is not None for state in states):
                mask_logits(logits, states, self._grammar_pool.tokenizer_vocab)

    def _record_prefix_cache_stats(self) -> None:
        if self.prefix_cache is not None:
            self.stats["prefix_cache_query_tokens"] = self.prefix_cache.query_tokens
            self.stats["prefix_cache_hit_tokens"] = self.prefix_cache.hit_tokens
            self.stats["prefix_cache_evicted_blocks"] = self.prefix_cache.evicted_blocks

    def _fail_batch(self, batch, error: Exception, touched: set[str]) -> None:
        """A step raised: every sequence it ran fails (its pages and adapter pin go back); the
        other requests, and later steps, are unaffected."""
        logger.exception("a step of %d sequences failed; they finish with an error",
                         len(batch.seqs))
        self.stats["failed_steps"] = self.stats.get("failed_steps", 0) + 1
        for seq in batch.seqs:
            if not seq.finished:
                seq.error = (f"internal error while running the request "
                             f"({type(error).__name__}); the server log has the details")
                seq.error_type = "internal_error"
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
                seq.finish_time = now()
            touched.add(seq.request_id)

    def _append_token(self, seq: Sequence, token: int, logprob: float, top) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now()
        seq.output_token_ids.append(token)
        seq.output_logprobs.append(logprob)
        seq.output_top_logprobs.append(top)
        seq.cumulative_logprob += logprob  # the order sum(output_logprobs) adds them in
        self.stats["generation_tokens"] += 1
        params = seq.params
        grammar_done = False
        if seq.grammar is not None:
            if not seq.grammar.accept(token):  # only a token the mask let through is sampled,
                # unless min_tokens held back the stop token the grammar required
                seq.error = (f"token {token} is not allowed by the request's "
                             f"{params.structured_outputs.kind} constraint")
                seq.error_type = "invalid_request"
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
                seq.finish_time = now()
                return
            grammar_done = seq.grammar.terminated()
        new_text = ""
        if self.tokenizer is not None:
            if seq.detokenizer is None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer,
                                                         params.skip_special_tokens)
            new_text = seq.detokenizer.add(seq.output_token_ids)
            seq.output_text += new_text
        generated = len(seq.output_token_ids)
        status, stopped_by_text = None, False
        if not params.ignore_eos and token in self.eos_token_ids and \
                generated > params.min_tokens:
            status = SequenceStatus.FINISHED_STOPPED
            seq.stop_reason = None
        elif token in params.stop_token_ids and generated > params.min_tokens:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
        elif params.stop_strings and self.tokenizer is not None:
            hit = find_stop(seq.output_text, len(new_text), params.stop_strings)
            if hit is not None:
                stop, at = hit
                end = at + len(stop) if params.include_stop_str_in_output else at
                seq.output_text = seq.output_text[:end]
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
                stopped_by_text = True
        if status is None and grammar_done:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, None
        if status is None and (generated >= seq.max_tokens or
                               seq.num_known_tokens >= self.max_model_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            if seq.detokenizer is not None and not stopped_by_text:
                seq.output_text += seq.detokenizer.flush(seq.output_token_ids)
            self.scheduler.finish(seq, status)
            seq.finish_time = now()

    def _output(self, state: _RequestState) -> RequestOutput:
        outputs = []
        for seq in state.seqs:
            logprobs = None
            if seq.params.logprobs is not None:
                for index in range(len(seq.logprob_entries), len(seq.output_token_ids)):
                    token = seq.output_token_ids[index]
                    entry = {token: Logprob(seq.output_logprobs[index])}
                    for rank, (tid, tlp) in enumerate(seq.output_top_logprobs[index] or [],
                                                      start=1):
                        if tid == token:
                            entry[token].rank = rank
                        else:
                            entry[tid] = Logprob(tlp, rank)
                    seq.logprob_entries.append(entry)
                logprobs = list(seq.logprob_entries)
            finish_reason = None
            if seq.status in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                              SequenceStatus.FINISHED_ABORTED, SequenceStatus.FINISHED_ERROR):
                finish_reason = seq.status.value
            outputs.append(CompletionOutput(
                index=seq.index, text=seq.output_text, token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.output_logprobs else None,
                logprobs=logprobs, finish_reason=finish_reason, stop_reason=seq.stop_reason))
            outputs[-1].error = seq.error
            outputs[-1].error_type = seq.error_type
        first = state.seqs[0]
        finished = all(s.finished for s in state.seqs)
        metrics = RequestMetrics(first.arrival_time, first.first_token_time,
                                 max((s.finish_time or 0) for s in state.seqs) if finished else None,
                                 sum(s.num_preemptions for s in state.seqs))
        if finished:
            self._requests.pop(state.request_id, None)
        return RequestOutput(state.request_id, state.prompt, list(state.prompt_token_ids),
                             outputs, finished, state.lora_request, metrics,
                             request_prompt_logprobs(first))

    # -- prompts -----------------------------------------------------------------------------
    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as "
                                 "{'prompt_token_ids': [...]}")
            return prompt, self.tokenizer.encode(prompt)
        raise TypeError(f"a prompt must be a str, a list of token ids or a dict with "
                        f"'prompt_token_ids', got {type(prompt).__name__}")

    # -- lifetime ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this engine was shut down")

    def shutdown(self) -> None:
        """Aborts every request, shuts the executor down (the other processes of a parallel
        engine stop; the step graphs, the adapter cache with its threads and host copies, the
        page pool and the model are freed) and returns the GPU memory to the driver.
        Idempotent; the engine serves nothing after. The runner and the adapter manager stay,
        closed, for their counters."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.device.type == "cuda":  # a step launched by async scheduling may still run
                torch.cuda.synchronize(self.device)
            for request_id in list(self._requests):
                self.abort_request(request_id)
        finally:
            self.executor.shutdown()
            if self._grammar_pool is not None:
                self._grammar_pool.shutdown()
            self.scheduler = self.kv = self.prefix_cache = None
            self.model = self.memory = None
            if self.device.type == "cuda":
                _return_cached_memory(self.device)

    def stop(self) -> None:
        self.shutdown()


class _ReleaseMarker:
    """See LLMEngine.__init__: dropped last of the engine's attributes."""


def _return_cached_memory(device: torch.device) -> None:
    """Hands the blocks torch's allocator cached for freed tensors back to the driver, with the
    cuBLAS workspaces torch keeps per (handle, stream): each engine's capture and copy streams
    got their own, and they would otherwise stay reserved after the engine is gone."""
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
