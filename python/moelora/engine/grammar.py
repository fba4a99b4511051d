"""Structured outputs with xgrammar: grammars compiled off the engine thread, token masks per step.

GrammarCompilerPool (one per engine, made when the first constrained request arrives) turns a
StructuredOutputsParams into an xgrammar CompiledGrammar on a small thread pool, and keeps the
results by constraint so a repeated schema compiles once. A request waits in the scheduler's queue
(not in a step) until its grammar is compiled; one whose constraint does not compile fails alone,
with a message naming the field.

Each constrained sequence holds a GrammarState: an xgrammar matcher over its generated tokens. A
step fills one bitmask row per constrained sampling row on the host and applies it to those rows'
logits on their device (`mask_logits`); tokens outside the tokenizer's vocabulary (padding rows of
a larger lm_head) are always masked. After sampling, the engine advances the matcher with the
token; a matcher that reaches its end finishes the request ("stop").

xgrammar is imported only here, when a request asks for a constraint.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from moelora.engine.structured_params import StructuredOutputsParams

COMPILE_THREADS = 2
CACHED_GRAMMARS = 256
BITS = 32  # tokens per bitmask word (xgrammar's int32 layout: bit i of word w is token 32w+i)


def import_xgrammar():
    try:
        import xgrammar
    except ImportError as error:
        raise ValueError("structured outputs (json, regex, choice, grammar, json_object) need "
                         "xgrammar: pip install xgrammar") from error
    return xgrammar


class GrammarCompilerPool:
    """Compiles constraints for one tokenizer and vocabulary, on COMPILE_THREADS threads."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self._xgr = import_xgrammar()
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        info, self.tokenizer_vocab = _tokenizer_info(self._xgr, tokenizer, vocab_size,
                                                     self.stop_token_ids)
        self._compiler = self._xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS)
        self._threads = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="moelora-grammar")
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> Future:
        """A future of the CompiledGrammar; it fails with a ValueError naming the field."""
        key = params.cache_key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._threads.submit(self._compile, params)
            self._cache[key] = future
            if len(self._cache) > CACHED_GRAMMARS:
                self._cache.popitem(last=False)
            return future

    def state(self, future: Future) -> GrammarState:
        """A matcher for one sequence, over the grammar `future` will hold."""
        return GrammarState(self._xgr, future, self.stop_token_ids)

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _compile(self, params: StructuredOutputsParams):
        kind = params.kind
        compiler = self._compiler
        try:
            if kind == "json":
                return compiler.compile_json_schema(
                    params.json, any_whitespace=not params.disable_any_whitespace)
            if kind == "json_object":  # an object, as OpenAI's response_format means it
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=not params.disable_any_whitespace)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(params.choice))
            return compiler.compile_grammar(params.grammar)
        except Exception as error:  # noqa: BLE001 - xgrammar raises several types for bad input
            detail = str(error).strip().splitlines()
            detail = detail[0] if detail else type(error).__name__
            raise ValueError(f"structured outputs: {kind} does not compile: {detail}") from None


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar accepting exactly one of `choices`."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarState:
    """One sequence's place in its grammar."""

    def __init__(self, xgr, future: Future, stop_token_ids: tuple[int, ...]):
        self._xgr = xgr
        self._future = future
        self._stop_token_ids = list(stop_token_ids)
        self._matcher = None

    def compiled(self) -> bool:
        """Whether the grammar compiled (False while compiling, and when it failed)."""
        return self._future.done() and self._future.exception() is None

    def failure(self) -> str | None:
        """Why the grammar did not compile, once it is done; None while compiling or compiled."""
        if not self._future.done():
            return None
        error = self._future.exception()
        return None if error is None else str(error)

    @property
    def matcher(self):
        if self._matcher is None:
            # Without stop tokens the grammar ends the request as soon as it is complete.
            self._matcher = self._xgr.GrammarMatcher(
                self._future.result(), override_stop_tokens=self._stop_token_ids or None,
                terminate_without_stop_token=not self._stop_token_ids)
        return self._matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


@torch.inference_mode()  # logits are the runner's inference tensors
def mask_logits(logits: torch.Tensor, states: list[GrammarState | None],
                tokenizer_vocab: int) -> None:
    """Sets the logits of tokens each row's grammar forbids to -inf, in place. logits:
    [len(states), vocab] float32; rows whose state is None are left as they are."""
    rows = [row for row, state in enumerate(states) if state is not None]
    if not rows:
        return
    vocab = logits.shape[1]
    words = (vocab + BITS - 1) // BITS
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)
    for index, row in enumerate(rows):
        states[row].fill(bitmask, index)
    bitmask = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(BITS, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(rows), -1)[:, :vocab]
    allowed[:, tokenizer_vocab:] = False
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill(~allowed,
                                                                             float("-inf")))


def _tokenizer_info(xgr, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
    """(xgrammar TokenizerInfo for a mask of `vocab_size` tokens, the tokenizer's own vocabulary
    size). The vocabulary, its encoding (byte-level, byte-fallback, raw) and whether it adds a
    prefix space come from the tokenizer's tokenizer.json, as xgrammar reads a transformers fast
    tokenizer; a transformers tokenizer (engine/tokenizer.py HFTokenizer) goes to xgrammar as
    is."""
    stops = list(stop_token_ids) or None
    backend = tokenizer.backend
    if not hasattr(backend, "to_str"):  # a transformers tokenizer
        info = xgr.TokenizerInfo.from_huggingface(backend, vocab_size=vocab_size,
                                                  stop_token_ids=stops)
        return info, min(vocab_size, len(backend))
    vocab = backend.get_vocab(with_added_tokens=True)
    tokenizer_vocab = max(len(vocab), max(vocab.values()) + 1)
    encoded = [""] * vocab_size
    for token, token_id in vocab.items():
        if token_id < vocab_size:
            encoded[token_id] = token
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    info = xgr.TokenizerInfo(encoded, vocab_type=metadata["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=stops, add_prefix_space=metadata["add_prefix_space"])
    return info, min(vocab_size, tokenizer_vocab)
