"""Fresh prefills attend through torch SDPA (moelora.engine.prefill_attention), everything else
through the paged kernel: the same logprobs as the all-paged engine, in mixed steps (new
prompts beside decodes and later chunks of chunked prompts), with GQA, and the paged fallback
for sinks (GPT-OSS) and windows shorter than a prompt."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import make_tiny
from moelora import LLM, SamplingParams
from moelora.engine import paged_context, prefill_attention


def _run(model_dir, monkeypatch, sdpa: bool, calls: list):
    real = prefill_attention.attend_fresh_spans

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(paged_context, "attend_fresh_spans", counting)
    if not sdpa:
        monkeypatch.setattr(paged_context, "fresh_spans_fit", lambda *args: False)
    # max_num_batched_tokens 24: long prompts are chunked, so steps mix fresh spans, later
    # chunks and decodes
    llm = LLM(model=model_dir, device="cpu", dtype="float32", max_num_seqs=4,
              max_num_batched_tokens=24, block_size=4, pool_memory_bytes=16 << 20)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 300, (n,), generator=gen).tolist() for n in (5, 40, 1, 13, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids,
             [max(lp.values(), key=lambda x: x.logprob).logprob for lp in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("family", ["llama", "mixtral", "gpt_oss"])
def test_sdpa_prefill_matches_the_paged_kernel(tmp_path, monkeypatch, family):
    make_tiny(family, tmp_path / "m")
    with monkeypatch.context() as m:
        paged_calls: list = []
        paged = _run(str(tmp_path / "m"), m, sdpa=False, calls=paged_calls)
    sdpa_calls: list = []
    sdpa = _run(str(tmp_path / "m"), monkeypatch, sdpa=True, calls=sdpa_calls)
    assert not paged_calls
    if family == "gpt_oss":
        assert not sdpa_calls  # sinks: every layer stays on the paged kernel
    else:
        assert sdpa_calls
    for (tokens_a, lps_a), (tokens_b, lps_b) in zip(paged, sdpa, strict=True):
        assert tokens_a == tokens_b
        torch.testing.assert_close(torch.tensor(lps_a), torch.tensor(lps_b), rtol=0, atol=1e-4)


def test_window_shorter_than_a_span_keeps_the_paged_kernel():
    assert prefill_attention.fresh_spans_fit(((0, 5), (5, 8)), 0, None)
    assert prefill_attention.fresh_spans_fit(((0, 5), (5, 8)), 8, None)
    assert not prefill_attention.fresh_spans_fit(((0, 5), (5, 9)), 8, None)
    assert not prefill_attention.fresh_spans_fit(((0, 5),), 0, torch.zeros(2))
    assert not prefill_attention.fresh_spans_fit((), 0, None)
