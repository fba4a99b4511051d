"""Structured outputs (xgrammar) on the demo's tiny random Mixtral and its byte-level tokenizer.

Random weights still must emit only grammar-valid text: JSON that parses and fits its schema, a
regex's full match, one of the choices, an EBNF grammar's sentence, a JSON object. A constraint
that does not compile fails its own request only; constrained rows share batches with adapters
and unconstrained rows, which are untouched; vLLM's two parameter names both work; the async
pipeline gives the same tokens as one step at a time.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from moelora import (
    LLM,
    GuidedDecodingParams,
    SamplingParams,
    StructuredOutputsParams,
)
from moelora.demo.assets import ADAPTERS, demo_lora_requests
from moelora.engine.grammar import GrammarCompilerPool, mask_logits
from moelora.engine.tokenizer import load_tokenizer

SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "color", "count"], "additionalProperties": False}
REGEX = r"[a-z]{3}-\d{2}"
CHOICES = ["alpha", "beta", "gamma delta"]
GRAMMAR = 'root ::= "(" digits ("," digits)? ")"\ndigits ::= [0-9] | [0-9] [0-9]'
GRAMMAR_REGEX = r"\(\d{1,2}(,\d{1,2})?\)"


@pytest.fixture(scope="module")
def llm(assets):
    model_dir, _ = assets
    return LLM(model=model_dir, device="cpu", enable_lora=True, max_lora_rank=16, max_loras=2,
               max_cpu_loras=len(ADAPTERS))


def _params(temperature=0.0, max_tokens=48, seed=None, **constraint):
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed,
                          structured_outputs=StructuredOutputsParams(**constraint))


def _check(kind: str, text: str) -> None:
    if kind == "json":
        value = json.loads(text)
        assert set(value) == {"ok", "color", "count"}
        assert isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue")
        assert isinstance(value["count"], int) and 0 <= value["count"] <= 99
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES
    elif kind == "grammar":
        assert re.fullmatch(GRAMMAR_REGEX, text), text
    else:
        assert isinstance(json.loads(text), dict)


CONSTRAINTS = {"json": {"json": SCHEMA, "disable_any_whitespace": True}, "regex": {"regex": REGEX},
               "choice": {"choice": CHOICES}, "grammar": {"grammar": GRAMMAR},
               "json_object": {"json_object": True}}


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_every_constraint_gives_valid_text_in_one_batch(llm, temperature):
    kinds = list(CONSTRAINTS)
    prompts = ["Hello", "Once upon a time", "The answer is", "Name a colour:", "{"]
    params = [_params(temperature, max_tokens=200 if kind == "json_object" else 48, seed=i,
                      **CONSTRAINTS[kind]) for i, kind in enumerate(kinds)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for kind, out in zip(kinds, outs):
        completion = out.outputs[0]
        if kind == "json_object" and completion.finish_reason == "length":
            continue  # any JSON object may go on past max_tokens on random weights
        assert completion.finish_reason == "stop", (kind, completion)
        _check(kind, completion.text)


def test_bad_constraints_fail_only_their_request(llm):
    bad = {"json": {"json": {"type": "object", "properties": {"a": {"type": "nosuchtype"}}}},
           "regex": {"regex": "[a-z"}, "grammar": {"grammar": "root ::= undefined_rule"}}
    params = [_params(**CONSTRAINTS["regex"])] + [_params(**c) for c in bad.values()] + \
             [SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)]
    outs = llm.generate(["Hello"] * len(params), params, use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "stop"
    _check("regex", outs[0].outputs[0].text)
    for kind, out in zip(bad, outs[1:-1]):
        completion = out.outputs[0]
        assert completion.finish_reason == "error" and completion.error_type == "invalid_request"
        assert f"{kind} does not compile" in completion.error, completion.error
    assert len(outs[-1].outputs[0].token_ids) == 5
    # a schema that is not JSON at all is refused before anything is queued
    with pytest.raises(ValueError, match="json: the schema is not valid JSON"):
        StructuredOutputsParams(json="{not json")


def test_constrained_rows_beside_adapters_and_unconstrained_rows(llm, assets):
    loras = demo_lora_requests(assets[1])
    prompt = "Once upon a time"
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    params = [plain, _params(**CONSTRAINTS["regex"]), plain, _params(**CONSTRAINTS["json"]),
              _params(**CONSTRAINTS["choice"])]
    adapters = [loras[0], loras[0], None, loras[1], None]
    outs = llm.generate([prompt] * len(params), params, lora_request=adapters, use_tqdm=False)
    _check("regex", outs[1].outputs[0].text)
    _check("json", outs[3].outputs[0].text)
    _check("choice", outs[4].outputs[0].text)
    for index in (0, 2):  # unconstrained rows: as alone
        alone = llm.generate(prompt, plain, lora_request=adapters[index], use_tqdm=False)
        assert alone[0].outputs[0].token_ids == outs[index].outputs[0].token_ids
    # the adapter's constrained output is the adapter's: as alone, and not the base model's
    alone = llm.generate(prompt, params[3], lora_request=loras[1], use_tqdm=False)
    assert alone[0].outputs[0].text == outs[3].outputs[0].text


def test_both_parameter_names_and_exactly_one_constraint(llm):
    new = SamplingParams(temperature=0.0, max_tokens=20,
                         structured_outputs=StructuredOutputsParams(choice=CHOICES))
    old = SamplingParams(temperature=0.0, max_tokens=20,
                         guided_decoding=GuidedDecodingParams(choice=CHOICES))
    a, b = llm.generate(["Pick one:"] * 2, [new, old], use_tqdm=False)
    assert a.outputs[0].text == b.outputs[0].text and a.outputs[0].text in CHOICES
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar, "
                                         "json_object; got json, regex"):
        StructuredOutputsParams(json=SCHEMA, regex=REGEX)
    with pytest.raises(ValueError, match="got none"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="different constraints"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"),
                       guided_decoding=GuidedDecodingParams(regex="b"))
    with pytest.raises(ValueError, match="backend 'outlines'"):
        StructuredOutputsParams(regex="a", backend="outlines")


def test_async_pipeline_gives_the_same_constrained_tokens(assets, llm):
    model_dir, _ = assets
    params = [_params(**CONSTRAINTS["json"]), SamplingParams(temperature=0.0, max_tokens=12,
                                                             ignore_eos=True),
              _params(temperature=1.0, seed=3, **CONSTRAINTS["grammar"])]
    prompts = ["Hello", "Hello", "Numbers:"]
    with LLM(model=model_dir, device="cpu", async_scheduling=True) as overlapped:
        ours = overlapped.generate(prompts, params, use_tqdm=False)
    reference = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == \
        [o.outputs[0].token_ids for o in reference]
    _check("json", ours[0].outputs[0].text)
    _check("grammar", ours[2].outputs[0].text)


def test_padding_rows_past_the_tokenizer_are_always_masked(assets):
    """A model vocabulary larger than the tokenizer's (a padded lm_head): ids past the tokenizer
    are never allowed, whatever the grammar."""
    tokenizer = load_tokenizer(assets[0])
    vocab = tokenizer.vocab_size + 37
    pool = GrammarCompilerPool(tokenizer, vocab, (tokenizer.eos_token_id,))
    try:
        assert pool.tokenizer_vocab == tokenizer.vocab_size
        compiled = pool.compile(StructuredOutputsParams(json_object=True))
        compiled.result(timeout=60)
        state = pool.state(compiled)
        logits = torch.randn(3, vocab)
        logits[:, tokenizer.vocab_size:] = 100.0  # the padding rows would win
        before = logits.clone()
        mask_logits(logits, [None, state, None], pool.tokenizer_vocab)
        assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
        allowed = torch.isfinite(logits[1])
        assert not allowed[tokenizer.vocab_size:].any()
        texts = {tokenizer.decode([t]) for t in torch.nonzero(allowed)[:, 0].tolist()}
        assert "{" in texts and texts <= {"{", " ", "\n", "\t", "\r"}, texts
    finally:
        pool.shutdown()


def test_refusals_without_tokenizer_or_xgrammar(tmp_path, assets, monkeypatch):
    from hf_tiny import make_tiny

    make_tiny("llama", tmp_path / "model")  # no tokenizer files
    with LLM(model=str(tmp_path / "model"), device="cpu", dtype="float32",
             pool_memory_bytes=8 << 20) as bare:
        prompt = {"prompt_token_ids": [5, 6, 7]}
        with pytest.raises(ValueError, match="stop strings need a tokenizer"):
            bare.generate(prompt, SamplingParams(stop=["x"]), use_tqdm=False)
        with pytest.raises(ValueError, match=r"structured outputs \(regex\) need a tokenizer"):
            bare.generate(prompt, _params(regex="a"), use_tqdm=False)
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if not installed
    tokenizer = load_tokenizer(assets[0])
    with pytest.raises(ValueError, match="pip install xgrammar"):
        GrammarCompilerPool(tokenizer, tokenizer.vocab_size, ())


@pytest.mark.gpu
def test_gpu_engine_masks_and_scores_prompts_like_the_cpu_engine(assets, llm):
    """On a GPU (decode graphs and async scheduling on by default): constrained outputs stay
    valid and equal the CPU engine's greedy text; prompt logprobs agree with the CPU's."""
    model_dir, _ = assets
    params = [_params(**CONSTRAINTS["json"]), _params(**CONSTRAINTS["regex"]),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=3),
              _params(temperature=1.0, seed=4, **CONSTRAINTS["grammar"])]
    prompts = ["Hello", "Once upon a time", "The quick brown fox jumps", "Numbers:"]
    with LLM(model=model_dir, device="cuda", dtype="float32") as gpu:
        ours = gpu.generate(prompts, params, use_tqdm=False)
    theirs = llm.generate(prompts, params, use_tqdm=False)
    _check("json", ours[0].outputs[0].text)
    _check("regex", ours[1].outputs[0].text)
    _check("grammar", ours[3].outputs[0].text)
    assert [o.outputs[0].text for o in ours[:2]] == [o.outputs[0].text for o in theirs[:2]]
    for a, b in zip(ours[2].prompt_logprobs[1:], theirs[2].prompt_logprobs[1:]):
        token = next(iter(b))
        assert a[token].logprob == pytest.approx(b[token].logprob, abs=1e-3)
