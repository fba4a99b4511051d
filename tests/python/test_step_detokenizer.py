"""Incremental detokenisation (moelora.engine.detokenizer) against decoding everything each step.

Random token sequences, special tokens included, over four tokenizers: the demo's byte-level
tokenizer (every byte a token, so multi-byte characters always span tokens), a byte-level BPE
trained here (merges cut across character boundaries), and two sentencepiece-style tokenizers
with byte fallback (Llama's Replace/ByteFallback/Fuse/Strip decoder, and Metaspace). At every
step the emitted text must be what of the full decode can no longer change, at the end exactly
the full decode, and stop strings must stop at the same token with the same text as the engine's
former rule (decode everything, search it), wherever that rule has a consistent answer.
"""

from __future__ import annotations

import json
import random

import pytest
from moelora.demo.assets import _write_tokenizer
from moelora.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer, find_stop
from moelora.engine.tokenizer import load_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CORPUS = ["héllo wörld, ça va? 你好世界 😀 naïve café", "the quick brown fox jumps over",
          "Ελληνικά και русский текст", "emoji 🎉🚀 and tabs\tand\nnewlines", "ﬁne — “quotes”"]


def _save(tok: Tokenizer, path, eos: str) -> object:
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return load_tokenizer(str(path))


def _byte_level_bpe(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|end|>", "<|user|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return _save(tok, path, "<|end|>")


def _byte_fallback(path, metaspace: bool):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", "▁the", "▁he", "llo", "h", "e", "l", "o", "▁w", "or", "ld", "é", "你",
                  "好", "▁ça", "▁▁", "a", "b", ",", "."]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.add_special_tokens(["<s>", "</s>"])
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁",
                                                            prepend_scheme="first"),
                                         decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return _save(tok, path, "</s>")


def _demo(path):
    path.mkdir()
    _write_tokenizer(str(path))
    return load_tokenizer(str(path))


@pytest.fixture(scope="module", params=["demo", "byte_level_bpe", "llama_fallback",
                                        "metaspace_fallback"])
def tokenizer(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / request.param
    return {"demo": _demo, "byte_level_bpe": _byte_level_bpe,
            "llama_fallback": lambda p: _byte_fallback(p, False),
            "metaspace_fallback": lambda p: _byte_fallback(p, True)}[request.param](path)


def _sequences(tokenizer, count: int, seed: int):
    rng = random.Random(seed)
    vocab = tokenizer.vocab_size
    real = [tokenizer.encode(text, add_special_tokens=False) for text in CORPUS]
    for index in range(count):
        if index % 3 == 0:  # text a model could produce, with random tokens spliced in
            ids = list(rng.choice(real))
            for _ in range(rng.randint(0, 4)):
                ids.insert(rng.randint(0, len(ids)), rng.randrange(vocab))
        else:
            ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        yield ids


def _takes_text_back(tokenizer, ids, skip_special_tokens=True) -> bool:
    """Whether the full decode ever changes text it showed complete: a byte-fallback run that
    turns invalid as a whole (every byte becomes U+FFFD, valid characters included)."""
    shown = ""
    for k in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:k], skip_special_tokens=skip_special_tokens)
        if not full.startswith(shown):
            return True
        shown = full.rstrip(REPLACEMENT)
    return False


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_text_is_the_full_decode_at_every_step(tokenizer, skip_special_tokens):
    """At every step the emitted text is the full decode without its trailing U+FFFD run (the
    character still incomplete); at the end, all of it. Sequences whose full decode takes text
    back (byte-fallback only) keep the text as it was streamed."""
    checked = 0
    for ids in _sequences(tokenizer, 300, seed=int(skip_special_tokens)):
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        exact = not _takes_text_back(tokenizer, ids, skip_special_tokens)
        text = ""
        for k in range(1, len(ids) + 1):
            new = detok.add(ids[:k])
            assert REPLACEMENT not in new[-1:], "an incomplete character is held back"
            text += new
            if exact:
                full = tokenizer.decode(ids[:k], skip_special_tokens=skip_special_tokens)
                assert text == full.rstrip(REPLACEMENT), (ids[:k], text, full)
        text += detok.flush(ids)
        if exact:
            assert text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids
            checked += 1
    assert checked >= 50  # byte-fallback: most random runs turn invalid


def test_byte_fallback_characters_split_over_byte_tokens_come_whole(tmp_path):
    """Real text through a byte-fallback tokenizer: characters outside the vocabulary are 2-4
    byte tokens; each appears whole, in the step of its last byte."""
    tokenizer = _byte_fallback(tmp_path / "llama", False)
    text = "na\u00efve \u4f60\u597d \U0001f600 caf\u00e9"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # mostly byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    streamed = [detok.add(ids[:k]) for k in range(1, len(ids) + 1)]
    assert "".join(streamed) + detok.flush(ids) == tokenizer.decode(ids) == text
    assert all(REPLACEMENT not in piece for piece in streamed)
    assert "\U0001f600" in streamed  # the emoji, in the step of its fourth byte


def _stop_by_full_decode(tokenizer, ids, stops):
    """The engine's rule before incremental decoding: decode everything, find each stop."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        for stop in stops:
            at = text.find(stop)
            if at >= 0:
                return k, text[:at]
    return None


def _stop_incrementally(tokenizer, ids, stops):
    detok = IncrementalDetokenizer(tokenizer)
    text = ""
    for k in range(1, len(ids) + 1):
        new = detok.add(ids[:k])
        text += new
        hit = find_stop(text, len(new), stops)
        if hit is not None:
            return k, text[:hit[1]]
    return None


def test_stop_strings_stop_at_the_same_token_with_the_same_text(tokenizer):
    rng = random.Random(5)
    checked = 0
    for ids in _sequences(tokenizer, 200, seed=3):
        if _takes_text_back(tokenizer, ids):
            continue  # the full decode stops on text it later replaces: no reference
        final = tokenizer.decode(ids)
        candidates = [final[i:i + n] for n in (1, 2, 3) for i in range(len(final) - n + 1)]
        candidates = [c for c in candidates if REPLACEMENT not in c]
        if not candidates:
            continue
        stops = rng.sample(candidates, min(3, len(candidates))) + ["never appears \x00"]
        expected = _stop_by_full_decode(tokenizer, ids, stops)
        assert expected is not None
        assert _stop_incrementally(tokenizer, ids, stops) == expected, (ids, stops)
        checked += 1
    assert checked >= 25


def test_find_stop_looks_only_where_a_new_stop_can_be():
    assert find_stop("abcdef", 2, ["cde"]) == ("cde", 2)  # starts before the new text
    assert find_stop("abcdef", 1, ["abc"]) is None  # wholly old: would have stopped already
    assert find_stop("abcabc", 3, ["bc", "ca"]) == ("bc", 4)  # list order, first new hit
    assert find_stop("xyz", 3, ["q"]) is None
