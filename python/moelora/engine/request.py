"""Request and sequence state, and the vLLM-shaped outputs handed back to users."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from moelora.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(eq=False)  # identity: the scheduler's `in` / remove() on its lists stay O(1) per item
class Sequence:
    """One sample of a request: its tokens, KV pages and progress."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: int | None  # native adapter id, None = base model
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    # What each step's output repeats, kept as tokens arrive instead of rebuilt from every token
    # each step: the running sum of output_logprobs, and the per-token logprob dicts made so far
    cumulative_logprob: float = 0
    logprob_entries: list = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    # Tokens sampled by steps still running on the GPU (async scheduling): they count in
    # num_tokens, so the scheduler plans the next step around them, but are not yet in
    # output_token_ids; the next step reads them from the device.
    num_pending_tokens: int = 0
    # [block][layer] -> page id. Grows only by appending; KVManager.free replaces the list, which
    # is how the device block table (engine/block_table.py) sees that its row is stale.
    block_pages: list[list[int]] = field(default_factory=list)
    kv_owner: int | None = None  # the page pool's owner id of the pages this sequence holds
    # sliding window size -> blocks whose pages of those layers went back to the pool
    window_released: dict[int, int] = field(default_factory=dict)
    # prefix caching (engine/prefix_cache.py): block index -> pool owner of a full prompt block
    # (cached or cacheable), the digests of the prompt's full blocks, blocks already published
    prefix_owners: dict[int, int] = field(default_factory=dict)
    prefix_digests: list = field(default_factory=list)
    published_blocks: int = 0
    stop_reason: str | int | None = None
    error: str | None = None
    error_type: str | None = None  # see CompletionOutput
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    output_text: str = ""
    detokenizer: object = None  # IncrementalDetokenizer of output_token_ids, made on first token
    pinned_adapter: bool = False  # holds a pin on its adapter while running
    generator: object = None  # torch.Generator for sampled (non-greedy) sequences
    max_tokens: int = 0  # resolved limit on generated tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without copying the whole sequence (called every step).
        Pending tokens are not known on the host: a range that reaches them comes back short."""
        prompt = len(self.prompt_token_ids)
        if start >= prompt:
            return self.output_token_ids[start - prompt:stop - prompt]
        if stop <= prompt:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - prompt]

    @property
    def num_tokens(self) -> int:
        """Prompt, generated and pending tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Prompt and generated tokens the host has (num_tokens without the pending ones)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def in_prefill(self) -> bool:
        # Tokens still to compute beyond the one that will be sampled next.
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status.finished


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


ERROR_TYPES = ("adapter_error", "invalid_request", "internal_error")


@dataclass
class CompletionOutput:
    """One sample of a request, as vLLM shapes it.

    A request that failed has finish_reason "error", `error` saying why (it names the adapter and
    at most a file's base name, never a server path) and `error_type` saying whose fault it was,
    so a server picks its status code without reading the message:

    * None: no error;
    * "adapter_error": the request's adapter cannot be served (bad weights, a file gone or
      changed since it was registered, an adapter larger than the pool) -- the client's choice
      of adapter, 4xx;
    * "invalid_request": the request itself cannot be served (longer than the pool can ever
      hold beside its adapter) -- 4xx;
    * "internal_error": the engine failed while running the request's step -- 5xx.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # why the request failed (finish_reason "error")
    error_type: str | None = None  # None or one of ERROR_TYPES

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: object = None
    metrics: RequestMetrics | None = None


def now() -> float:
    return time.monotonic()
