"""SamplingParams.prompt_logprobs against transformers' log_softmax of the whole prompt.

A tiny random Mixtral (and a PEFT adapter on it) built in-process; the engine runs on the CPU in
float32. Every prompt position after the first must hold the actual token's logprob and rank and
the top k, token-identical to transformers' and within float32 tolerance, whether the prompt is
prefilled in one step or in chunks, with or without async scheduling, with prefix caching on (a
cached prefix has no logits: such requests recompute it), under an adapter, and beside requests
that do not ask.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from hf_tiny import make_tiny
from moelora import LLM, LoRARequest, SamplingParams
from test_lora_peft import PEFT_CASES

TOL = 2e-4  # float32: the engine's kernels sum in another order than transformers'
VOCAB = 300


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_logprobs")
    hf_model, _ = make_tiny("mixtral", root / "model")
    peft_model = peft.get_peft_model(copy.deepcopy(hf_model),
                                     peft.LoraConfig(init_lora_weights=False,
                                                     **PEFT_CASES["mixtral"]))
    peft_model.save_pretrained(root / "adapter")
    return {"dir": str(root / "model"), "hf": hf_model, "peft": peft_model.eval(),
            "adapter": LoRARequest("adapter", 1, str(root / "adapter"))}


def _llm(tiny, **kwargs) -> LLM:
    return LLM(model=tiny["dir"], device="cpu", dtype="float32", enable_lora=True,
               max_lora_rank=8, max_loras=2, pool_memory_bytes=32 << 20, **kwargs)


def _prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _reference(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row p scores token p + 1


def _assert_matches(prompt_logprobs, prompt: list[int], reference: torch.Tensor, k: int):
    assert len(prompt_logprobs) == len(prompt)
    assert prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry, row = prompt_logprobs[position], reference[position - 1]
        token = prompt[position]
        assert entry[token].logprob == pytest.approx(float(row[token]), abs=TOL)
        assert entry[token].rank == int((row >= row[token] - 1e-6).sum())
        top_values, top_ids = torch.topk(row, k)
        others = {t: lp for t, lp in entry.items() if t != token}
        expected = {int(t): float(v) for t, v in zip(top_ids, top_values) if int(t) != token}
        assert set(others) == set(expected), f"position {position}"
        for t, lp in others.items():
            assert lp.logprob == pytest.approx(expected[t], abs=TOL)
            assert lp.rank == top_ids.tolist().index(t) + 1


@pytest.mark.parametrize("chunk", [2048, 5], ids=["one-step", "chunked"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prompt_logprobs_match_transformers(tiny, chunk, async_scheduling):
    llm = _llm(tiny, max_num_batched_tokens=chunk, async_scheduling=async_scheduling)
    prompts = _prompts(7, 23, 1, 12)
    asks = [3, 0, 2, None]  # the last one does not ask, in the same batch
    params = [SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=k)
              for k in asks]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, k, out in zip(prompts, asks, outs):
        if k is None:
            assert out.prompt_logprobs is None
            continue
        _assert_matches(out.prompt_logprobs, prompt, _reference(tiny["hf"], prompt), k)
        if k == 0:
            assert all(len(entry) == 1 for entry in out.prompt_logprobs[1:])
    if async_scheduling:
        assert llm.llm_engine.stats.get("overlapped_steps", 0) > 0, "steps overlapped"
    # the request that did not ask generates what it generates alone
    alone = llm.generate({"prompt_token_ids": prompts[3]}, params[3], use_tqdm=False)
    assert alone[0].outputs[0].token_ids == outs[3].outputs[0].token_ids


def test_prompt_logprobs_under_an_adapter_in_a_mixed_batch(tiny):
    llm = _llm(tiny, max_num_batched_tokens=6)
    prompt = _prompts(11, seed=1)[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    base, adapted = llm.generate([{"prompt_token_ids": prompt}] * 2, params,
                                 lora_request=[None, tiny["adapter"]], use_tqdm=False)
    _assert_matches(base.prompt_logprobs, prompt, _reference(tiny["hf"], prompt), 2)
    _assert_matches(adapted.prompt_logprobs, prompt, _reference(tiny["peft"], prompt), 2)
    assert adapted.prompt_logprobs[5] != base.prompt_logprobs[5]


def test_prefix_cache_is_not_reused_for_prompt_logprobs(tiny):
    llm = _llm(tiny, enable_prefix_caching=True, block_size=4)
    engine = llm.llm_engine
    prompt = _prompts(18, seed=2)[0]
    plain = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt}, plain, use_tqdm=False)  # caches 4 blocks
    llm.generate({"prompt_token_ids": prompt}, plain, use_tqdm=False)
    hits = engine.stats["prefix_cache_hit_tokens"]
    assert hits == 16, "the second plain request reuses the cached blocks"
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True,
                                      prompt_logprobs=1), use_tqdm=False)[0]
    assert engine.stats["prefix_cache_hit_tokens"] == hits, "recomputed, not reused"
    _assert_matches(out.prompt_logprobs, prompt, _reference(tiny["hf"], prompt), 1)


def test_n_samples_share_one_prompt_logprobs_and_whole_vocab_needs_max_logprobs(tiny):
    prompt = _prompts(6, seed=3)[0]
    llm = _llm(tiny)
    with pytest.raises(ValueError, match=r"prompt_logprobs=-1 exceeds .*max_logprobs \(20"):
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(prompt_logprobs=-1),
                     use_tqdm=False)
    roomy = _llm(tiny, max_logprobs=VOCAB)
    out = roomy.generate({"prompt_token_ids": prompt},
                         SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=2,
                                        prompt_logprobs=-1), use_tqdm=False)[0]
    assert len(out.outputs) == 2
    assert all(len(entry) == VOCAB for entry in out.prompt_logprobs[1:])
    _assert_matches(out.prompt_logprobs, prompt, _reference(tiny["hf"], prompt), VOCAB)
