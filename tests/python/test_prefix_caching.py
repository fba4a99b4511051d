"""Automatic prefix caching (enable_prefix_caching): identical prompt prefixes of the same
adapter reuse their KV blocks, other adapters never do, and outputs stay exactly those of the
engine without caching (float32, CPU) through eviction, preemption and tensor parallel."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from hf_tiny import make_tiny
from moelora import LLM, LoRARequest, SamplingParams
from moelora.distributed import MultiProcExecutor, ParallelConfig
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine
from test_engine_vs_hf import SECOND_CASES

ARGS = {"device": "cpu", "dtype": "float32", "enable_lora": True, "max_lora_rank": 8,
        "max_loras": 2, "block_size": 4, "max_num_batched_tokens": 32}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    hf_model, _ = make_tiny("mixtral", root / "model")
    adapters = []
    for index in range(2):  # k_proj/o_proj + gate_up: the adapter changes the cached keys
        torch.manual_seed(20 + index)
        peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
            init_lora_weights=False, **SECOND_CASES["mixtral"])).save_pretrained(root / f"a{index}")
        adapters.append(LoRARequest(f"a{index}", index + 1, str(root / f"a{index}")))
    return str(root / "model"), adapters


def _waves(llm, waves, max_tokens=5):
    """Runs each wave of (prompt, adapter) to completion, one wave after the other."""
    out = []
    for wave in waves:
        results = llm.generate([{"prompt_token_ids": p} for p, _ in wave],
                               SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                              ignore_eos=True),
                               lora_request=[a for _, a in wave], use_tqdm=False)
        out.append([r.outputs[0].token_ids for r in results])
    return out


def _prompts(seed, system_len=13):
    gen = torch.Generator().manual_seed(seed)
    system = torch.randint(2, 300, (system_len,), generator=gen).tolist()
    return [system + torch.randint(2, 300, (n,), generator=gen).tolist() for n in (3, 6, 1, 9)]


def test_shared_prefix_is_reused_per_adapter_only(model):
    model_dir, (a0, a1) = model
    prompts = _prompts(1)
    waves = [[(prompts[0], a0), (prompts[1], None)],
             [(prompts[2], a0), (prompts[3], None), (prompts[1], a1), (prompts[0], a0)]]
    want = _waves(LLM(model=model_dir, **ARGS), waves)
    llm = LLM(model=model_dir, enable_prefix_caching=True, **ARGS)
    got = _waves(llm, waves)
    assert got == want
    stats = llm.llm_engine.stats
    # wave 2: three sequences find the 3 system blocks (12 tokens) of their adapter (a0, base,
    # a0 again with its whole 16-token prompt: 3 blocks, the last token recomputed); a1 finds
    # nothing, its keys differ.
    assert stats["prefix_cache_hit_tokens"] == 3 * 12, stats


def test_eviction_and_preemption_keep_outputs(model):
    model_dir, (a0, a1) = model
    waves = []
    for seed in range(6):  # more distinct prefixes than a small pool keeps
        prompts = _prompts(100 + seed, system_len=17)
        waves.append([(p, [None, a0, a1][(seed + i) % 3]) for i, p in enumerate(prompts)])
    want = _waves(LLM(model=model_dir, **ARGS), waves)
    roomy = LLM(model=model_dir, enable_prefix_caching=True, **{**ARGS, "max_num_seqs": 4})
    assert _waves(roomy, waves) == want
    # a pool that holds one adapter and about two sequences: cached blocks must be evicted,
    # sequences preempted
    adapters = roomy.llm_engine.adapters
    pages = adapters.num_pages(adapters.resolve(a0)) + 30
    cramped = LLM(model=model_dir, enable_prefix_caching=True,
                  **{**ARGS, "pool_memory_bytes": pages * roomy.llm_engine.memory.page_bytes})
    assert _waves(cramped, waves) == want
    stats = cramped.llm_engine.stats
    assert stats["prefix_cache_evicted_blocks"] > 0 and stats["preemptions"] > 0, stats


def test_prefix_caching_under_tensor_parallel(model):
    model_dir, (a0, _) = model
    prompts = _prompts(7)
    plan = [(p, a0 if i % 2 else None) for i, p in enumerate(prompts)]
    waves = [plan[:2], plan[2:] + plan[:1]]
    want = _waves(LLM(model=model_dir, **ARGS), waves)
    config = EngineConfig(model_dir, enable_prefix_caching=True, **ARGS)
    engine = LLMEngine(config, MultiProcExecutor(config, ParallelConfig(2)))
    try:
        got = []
        for w, wave in enumerate(waves):
            params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
            for i, (prompt, adapter) in enumerate(wave):
                engine.add_request(f"{w}-{i}", {"prompt_token_ids": prompt}, params, adapter)
            done = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.outputs[0].token_ids
            got.append([done[f"{w}-{i}"] for i in range(len(wave))])
        assert got == want
        assert engine.stats["prefix_cache_hit_tokens"] > 0
    finally:
        engine.stop()


@pytest.mark.parametrize("spare_pages", [-1, 1])
def test_requests_that_cannot_fit_beside_their_adapter_fail_clearly(model, spare_pages):
    """A pool one page short of the adapter: the adapter alone is larger than the pool; one
    page over it: it fits, but not together with the request's KV cache. Either way the
    adapter's requests fail with the reason instead of waiting forever, and the base-model
    requests still finish."""
    model_dir, (a0, _) = model
    probe = LLM(model=model_dir, **ARGS).llm_engine
    pages = probe.adapters.num_pages(probe.adapters.resolve(a0)) + spare_pages
    llm = LLM(model=model_dir, enable_prefix_caching=True,
              **{**ARGS, "pool_memory_bytes": pages * probe.memory.page_bytes})
    prompts = _prompts(3, system_len=17)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]],
                        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                        lora_request=[a0, None], use_tqdm=False)
    failed, base = outs[0].outputs[0], outs[1].outputs[0]
    assert failed.finish_reason == "error" and not failed.token_ids
    assert len(base.token_ids) == 5
    message = llm.llm_engine.adapters.failure(llm.llm_engine.adapters.resolve(a0)) or ""
    assert spare_pages > 0 or "more than the whole page pool" in message
