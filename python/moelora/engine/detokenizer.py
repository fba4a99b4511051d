"""Incremental detokenisation: a new token costs the decode of a few tokens, not of the whole
output, and stop strings are looked for in the new text only.

vLLM's prefix / read offsets over the tokenizer's own decode(): the text of tokens [0, read) has
been emitted; tokens [prefix, read) are context. Each step decodes [prefix, n) and emits what it
adds to the decode of the context, so start-of-text effects of the decoder (a sentencepiece
decoder drops the first token's leading space) fall on the context, never on new tokens.

Three refinements keep the text what decode(all tokens) gives at the end:

- An incomplete character at the end (a multi-byte UTF-8 character whose bytes span tokens,
  byte-level or byte-fallback tokens) decodes as U+FFFD until its last byte arrives. The text up
  to the trailing U+FFFD run is emitted at once (a byte-level decoder never changes it again);
  the run is held back and the offsets stay, so the next decode completes it. flush() emits what is
  still held when the sequence ends (an incomplete character stays U+FFFD, as in a full decode).
- Byte-fallback tokens (<0x41>, sentencepiece's) are decoded a run at a time, and a run that is
  not valid UTF-8 as a whole becomes U+FFFD for every byte, valid characters included. So the
  offsets never move into a run of byte tokens (a skipped special token does not end a run: the
  decoder never sees it): each decode sees the whole run. Its complete characters are emitted at
  once, as a full decode shows them; if later bytes make the run invalid, the full decode takes
  them back as U+FFFD and the emitted text keeps them (text once streamed stays).
- The context moves forward only onto tokens that print something on their own: a context of
  skipped special tokens (or of a lone space a decoder strips) would leave a new token at the
  start of the decoded window.

A tokenizer whose decode of a window does not extend the decode of its context (decoders that
rewrite text across token boundaries) is detected and decoded in full from then on.
"""

from __future__ import annotations

import re
import weakref

REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_byte_tokens_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._prefix = 0  # first context token
        self._read = 0  # tokens [0, read) are emitted in full
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._held = 0  # characters past `read` already emitted (the stable part of a held tail)
        self._emitted = 0  # characters emitted in all
        self._whole = False  # decode everything each time (see the module docstring)
        self._byte_tokens = byte_fallback_tokens(tokenizer)
        self._silent_tokens: dict[int, bool] = {}  # token -> decodes to "" on its own

    def add(self, ids: list[int]) -> str:
        """The text that `ids` (every token so far; at least one more than the last call) adds
        to what was emitted, without a trailing incomplete character."""
        if self._whole:
            return self._add_whole(ids)
        window = self._decode(ids[self._prefix:])
        if not window.startswith(self._prefix_text):
            self._whole = True
            return self._add_whole(ids)
        tail = window[len(self._prefix_text):]
        stable = len(tail.rstrip(REPLACEMENT))
        new = tail[self._held:stable]
        if stable == len(tail) and not self._byte_run(ids, self._read):
            # nothing held: [read, n) is emitted in full
            context = self._decode(ids[self._read:])
            if context:
                self._prefix, self._prefix_text = self._read, context
            else:
                self._prefix_text = window
            self._read, self._held = len(ids), 0
        else:
            self._held = max(self._held, stable)
        self._emitted += len(new)
        return new

    def flush(self, ids: list[int]) -> str:
        """The text held back at the end (a character whose bytes never completed)."""
        if self._whole:
            return self._decode(ids)[self._emitted:]
        tail = self._decode(ids[self._prefix:])[len(self._prefix_text):]
        rest = tail[self._held:]
        self._held = len(tail)
        self._emitted += len(rest)
        return rest

    def _add_whole(self, ids: list[int]) -> str:
        text = self._decode(ids)
        stable = len(text.rstrip(REPLACEMENT))
        new = text[self._emitted:stable]
        self._emitted += len(new)
        return new

    def _byte_run(self, ids: list[int], start: int) -> int:
        """Length of the run of byte-fallback tokens that ends ids (not reaching below start).
        Tokens that decode to nothing (skipped special tokens) do not end a run: the decoder
        never sees them, so the bytes on either side join."""
        if not self._byte_tokens:
            return 0
        end = len(ids)
        while end > start and (ids[end - 1] in self._byte_tokens or self._silent(ids[end - 1])):
            end -= 1
        return len(ids) - end

    def _silent(self, token: int) -> bool:
        silent = self._silent_tokens.get(token)
        if silent is None:
            silent = self._silent_tokens[token] = self._decode([token]) == ""
        return silent

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


def byte_fallback_tokens(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's byte-fallback tokens (<0x00> ... <0xFF>), found once per
    tokenizer in its vocabulary (the `tokenizers` Tokenizer or transformers tokenizer that the
    engine's Tokenizer / HFTokenizer wrap); empty when the vocabulary cannot be read."""
    try:
        return _byte_tokens_of[tokenizer]
    except (KeyError, TypeError):
        pass
    inner = getattr(tokenizer, "_tok", tokenizer)
    get_vocab = getattr(inner, "get_vocab", None)
    vocab = get_vocab() if callable(get_vocab) else {}
    found = frozenset(i for token, i in vocab.items()
                      if isinstance(token, str) and _BYTE_TOKEN.fullmatch(token))
    try:
        _byte_tokens_of[tokenizer] = found
    except TypeError:  # not weakly referenceable: found again next time
        pass
    return found


def find_stop(text: str, num_new: int, stops: list[str]) -> tuple[str, int] | None:
    """The first of `stops` (in their order) that occurs in `text`, and where, given that none
    occurred before its last `num_new` characters were added: only the new characters and the
    tail a stop string could start in are searched."""
    for stop in stops:
        at = text.find(stop, max(0, len(text) - num_new - len(stop) + 1))
        if at >= 0:
            return stop, at
    return None
