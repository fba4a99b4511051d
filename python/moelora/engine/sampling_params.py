"""SamplingParams with vLLM's names and defaults, validated on construction.

Every bad field raises ValueError (never TypeError): to a server, any malformed field is a bad
request, answered 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moelora.engine.structured_params import GuidedDecodingParams, StructuredOutputsParams

MAX_N = 1024  # samples of one request


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence among the generated tokens
    repetition_penalty: float = 1.0  # divides (or multiplies, if negative) logits of tokens
    #                                  in the prompt or generated so far (transformers' rule)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per generated token
    # Logprobs of the prompt's tokens: the actual token's and the top k at each position after
    # the first (0: the actual token's only; -1: the whole vocabulary)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # One grammar constraint (JSON schema, regex, choice, EBNF, any JSON object); guided_decoding
    # is vLLM's earlier name for the same thing
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: GuidedDecodingParams | None = None
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.n = _integer("n", self.n, low=1, high=MAX_N)
        self.temperature = _real("temperature", self.temperature, low=0.0)
        self.top_p = _real("top_p", self.top_p, low=0.0, high=1.0)
        if self.top_p == 0.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is None or self.top_k == 0:
            self.top_k = -1
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        self.min_p = _real("min_p", self.min_p, low=0.0, high=1.0)
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, _real(name, getattr(self, name), low=-2.0, high=2.0))
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty, low=0.0)
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be > 0, got 0.0")
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens, low=1)
        self.min_tokens = _integer("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                             f"({self.max_tokens})")
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs, low=0)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _integer("prompt_logprobs", self.prompt_logprobs, low=-1)
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, low=-(1 << 63), high=(1 << 64) - 1)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(  # noqa: TRY004 - a bad field is a bad request (400)
                    f"{name} must be true or false, got {getattr(self, name)!r}")
        self._resolve_structured_outputs()
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop_strings = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got "
                             f"{type(self.stop).__name__}")
        if any(not isinstance(s, str) or s == "" for s in self.stop_strings):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple, type(None))):
            raise ValueError("stop_token_ids must be a list of token ids")  # noqa: TRY004
        self.stop_token_ids = list(self.stop_token_ids or [])
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0
               for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")

    def check_limits(self, *, max_logprobs: int, vocab_size: int) -> None:
        """The checks that depend on the engine: logprobs and prompt_logprobs up to its
        max_logprobs (vLLM's rule, 20 unless LLM(max_logprobs=...) raises it) and the vocabulary,
        token ids inside the vocabulary."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            wanted = vocab_size if value == -1 else value  # -1: the whole vocabulary
            if value is not None and wanted > min(max_logprobs, vocab_size):
                raise ValueError(f"{name}={value} exceeds the engine's max_logprobs "
                                 f"({max_logprobs}; raise it with LLM(max_logprobs=...)), "
                                 f"vocabulary {vocab_size}")
        if self.logit_bias and max(self.logit_bias) >= vocab_size:
            raise ValueError(f"logit_bias token id {max(self.logit_bias)} is outside the "
                             f"vocabulary [0, {vocab_size})")
        if self.stop_token_ids and max(self.stop_token_ids) >= vocab_size:
            raise ValueError(f"stop_token_ids holds {max(self.stop_token_ids)}, outside the "
                             f"vocabulary [0, {vocab_size})")

    def _resolve_structured_outputs(self) -> None:
        """structured_outputs and guided_decoding are one setting under two names: either
        may be given (both only when equal); structured_outputs holds the result."""
        for name in ("structured_outputs", "guided_decoding"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, StructuredOutputsParams):
                raise ValueError(f"{name} must be a StructuredOutputsParams, got "
                                 f"{type(value).__name__}")
        if self.guided_decoding is not None:
            if self.structured_outputs is not None and \
                    self.structured_outputs.cache_key() != self.guided_decoding.cache_key():
                raise ValueError("structured_outputs and guided_decoding name different "
                                 "constraints; give one of them")
            self.structured_outputs = self.structured_outputs or self.guided_decoding

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or biases change the logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0)


def _integer(name: str, value, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")  # noqa: TRY004
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _real(name: str, value, *, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")  # noqa: TRY004
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _logit_bias(bias) -> dict[int, float] | None:
    if not isinstance(bias, dict):
        raise ValueError(  # noqa: TRY004
            f"logit_bias must map token ids to biases, got {type(bias).__name__}")
    out = {}
    for token, value in bias.items():
        try:
            token_id = int(token)
        except (TypeError, ValueError):  # includes digit strings past Python's int-string limit
            shown = repr(token) if len(str(token)) <= 32 else repr(str(token)[:32]) + "..."
            raise ValueError(f"logit_bias keys must be token ids, got {shown}") from None
        if token_id < 0:
            raise ValueError(f"logit_bias token ids must be >= 0, got {token_id}")
        out[token_id] = _real(f"logit_bias[{token_id}]", value, low=-100.0, high=100.0)
    return out or None
