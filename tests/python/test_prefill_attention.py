"""Prefill chunks attend through torch SDPA (moelora.engine.prefill_attention), their cached
prefixes gathered from the pool's pages; decode tokens through the paged kernel: the same
tokens and logprobs as the all-paged engine, in mixed steps (new prompts beside decodes and
later chunks of chunked prompts), with GQA, a sliding window shorter than the prompts, prefix
caching, and attention sinks (GPT-OSS: a virtual key)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import make_tiny
from moelora import LLM, SamplingParams, ops
from moelora.engine import paged_context, prefill_attention


def _run(model_dir, monkeypatch, sdpa: bool, calls: list, prefix_caching=False):
    real = prefill_attention.attend_spans

    def counting(q, k, v, spans, *args):
        calls.extend(span.start for span in spans)
        return real(q, k, v, spans, *args)

    monkeypatch.setattr(paged_context, "attend_spans", counting)
    if not sdpa:
        monkeypatch.setattr(paged_context, "spans_fit", lambda *args: False)
    # max_num_batched_tokens 24: long prompts are chunked, so steps mix fresh spans, later
    # chunks (a cached prefix to gather) and decodes
    llm = LLM(model=model_dir, device="cpu", dtype="float32", max_num_seqs=4,
              max_num_batched_tokens=24, block_size=4, pool_memory_bytes=16 << 20,
              enable_prefix_caching=prefix_caching)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 300, (n,), generator=gen).tolist() for n in (5, 40, 1, 13, 9)]
    if prefix_caching:  # later prompts share the first 16 tokens of an earlier one
        prompts += [prompts[1][:16] + p for p in prompts[3:]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids,
             [max(lp.values(), key=lambda x: x.logprob).logprob for lp in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("family,window,prefix_caching", [
    ("llama", None, False), ("mixtral", None, False), ("mixtral", 6, False),
    ("llama", None, True), ("gpt_oss", None, False)])
def test_sdpa_prefill_matches_the_paged_kernel(tmp_path, monkeypatch, family, window,
                                               prefix_caching):
    make_tiny(family, tmp_path / "m")
    if window:
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        config["sliding_window"] = window
        (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with monkeypatch.context() as m:
        paged_calls: list = []
        paged = _run(str(tmp_path / "m"), m, False, paged_calls, prefix_caching)
    sdpa_calls: list = []
    sdpa = _run(str(tmp_path / "m"), monkeypatch, True, sdpa_calls, prefix_caching)
    assert not paged_calls
    assert 0 in sdpa_calls and any(start > 0 for start in sdpa_calls)  # fresh and gathered
    for (tokens_a, lps_a), (tokens_b, lps_b) in zip(paged, sdpa, strict=True):
        assert tokens_a == tokens_b
        torch.testing.assert_close(torch.tensor(lps_a), torch.tensor(lps_b), rtol=0, atol=1e-4)


def _attention_plan(device, **overrides):
    return ops.plan_attention(num_heads=4, num_kv_heads=2, head_dim=16, page_bytes=512,
                              max_context=64, dtype=torch.bfloat16, device=device,
                              overrides=ops.PlanOverrides(**overrides))


def test_spans_and_their_first_keys():
    span = prefill_attention.PrefillSpan(first=3, count=4, seq=1, start=10)
    assert prefill_attention.first_key(span, 0) == 0
    assert prefill_attention.first_key(span, 6) == 5  # position 10 sees keys 5..10
    assert prefill_attention.first_key(span, 20) == 0
    assert prefill_attention.spans_fit((span,), _attention_plan("cpu"))
    assert not prefill_attention.spans_fit((), _attention_plan("cpu"))


def test_prefill_attention_mode_picks_sdpa_on_the_cpu_only():
    span = prefill_attention.PrefillSpan(first=0, count=4, seq=0, start=0)
    cuda = ops.DeviceProps(cuda=True, sm_count=132, cc_major=9)
    assert prefill_attention.spans_fit((span,), _attention_plan("cpu"))
    assert not prefill_attention.spans_fit((span,), _attention_plan(cuda))  # paged is faster
    assert prefill_attention.spans_fit((span,), _attention_plan(cuda, prefill_attention="sdpa"))
    assert not prefill_attention.spans_fit((span,),
                                           _attention_plan("cpu", prefill_attention="paged"))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("start,window,use_sinks", [
    (0, 0, False), (0, 0, True), (9, 0, False), (9, 5, True), (0, 4, True)])
def test_attend_spans_matches_the_float64_reference(dtype, tol, start, window, use_sinks):
    from test_ops_paged_attention import reference

    gen = torch.Generator().manual_seed(start + window)
    count, heads, kv_heads, dim = 7, 4, 2, 16
    total = start + count
    keys = torch.randn(total, kv_heads, dim, generator=gen).to(dtype)
    values = torch.randn(total, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(count, heads, dim, generator=gen).to(dtype)
    sinks = torch.randn(heads, generator=gen) * 2 if use_sinks else None
    span = prefill_attention.PrefillSpan(first=0, count=count, seq=0, start=start)
    out = torch.full_like(q, float("nan"))
    prefill_attention.attend_spans(
        q, keys[start:], values[start:], [span], 0.25, window, sinks, out,
        lambda s, lo: (keys[lo:s.start], values[lo:s.start]))
    expected = reference(q.double(), [keys], [values], torch.zeros(count, dtype=torch.int32),
                         torch.arange(start, total), [total], 0.25, window, sinks)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
