"""Async scheduling (moelora.engine.step_pipeline) against the synchronous engine, on the CPU.

On the CPU a launch runs to completion, so nothing overlaps in time, but every part of the
pipeline runs: step N+1 is scheduled and launched before step N's tokens are appended, pending
tokens feed the next step from the sampled tensor, sequences that stop on step N's token have
their N+1 token dropped, length-finished ones are left out of N+1. Outputs (tokens, text,
finish and stop reasons, logprobs) must equal the synchronous engine's for greedy and seeded
sampling, stop strings and ids, min_tokens, penalties (which fall back to one step at a time),
the model's length limit, preemption, prefix caching, aborts mid-flight and failing adapters;
and every page and pin must come back.
"""

from __future__ import annotations

import math

import pytest
import torch
from moelora import LLM, LoRARequest, SamplingParams
from moelora.demo.assets import ADAPTERS, demo_lora_requests
from moelora.engine.paged_context import PagedContext
from moelora.engine.request import Sequence
from moelora.engine.scheduler import ScheduledBatch
from moelora.ops import PlanOverrides
from moelora.ops import moe as moe_ops
from test_adapter_faults import accounts, make_llm, poison, write_adapter


def _summary(outputs):
    """(everything a request returns but logprobs, its logprobs): logprobs are compared with a
    tolerance (threads of the CPU kernels may sum in another order from run to run)."""
    exact, numbers = [], []
    for output in outputs:
        for c in output.outputs:
            ranks = None if c.logprobs is None else [
                {t: lp.rank for t, lp in entry.items()} for entry in c.logprobs]
            exact.append((output.request_id, c.token_ids, c.text, c.finish_reason,
                          c.stop_reason, ranks, c.error_type))
            numbers.append(c.cumulative_logprob or 0.0)
            for entry in c.logprobs or []:
                numbers.extend(lp.logprob for lp in entry.values())
    return exact, numbers


def _same(got, want, tolerance=1e-4):
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=tolerance)


def _run(monkeypatch, asynchronous: bool, make, prompts, params, loras=None):
    llm = make()
    llm.llm_engine.config.async_scheduling = asynchronous  # read on the first step
    outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    engine = llm.llm_engine
    assert (engine._step_pipeline() is not None) == asynchronous
    assert not engine.has_unfinished_requests() and engine.kv.deferred_frees == 0
    engine.kv.evict_cached_blocks()  # prefix caching keeps blocks for later prompts
    assert engine.memory.pool.stats()["kv_pages"] == 0
    return _summary(outputs), engine


def _both(monkeypatch, make, prompts, params, loras=None, overlaps=True, tolerance=1e-4):
    want, _ = _run(monkeypatch, False, make, prompts, params, loras)
    got, engine = _run(monkeypatch, True, make, prompts, params, loras)
    _same(got, want, tolerance)
    assert (engine.stats.get("overlapped_steps", 0) > 0) == overlaps
    return engine


PROMPTS = ["Once upon a time", "The sea", "Roses are red", "abc", "request number 7 " * 3]


def _demo(assets, **args):
    model_dir, _ = assets
    options = {"model": model_dir, "device": "cpu", "enable_lora": True, "max_lora_rank": 16,
               "max_loras": 2, "max_cpu_loras": len(ADAPTERS)}
    options.update(args)
    return lambda: LLM(**options)


def test_greedy_with_mixed_adapters_and_lengths(assets, monkeypatch):
    loras = demo_lora_requests(assets[1])
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 4 * i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    _both(monkeypatch, _demo(assets), PROMPTS, params, [None, *loras[:4]])


def test_seeded_sampling_with_logprobs_and_n(assets, monkeypatch):
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=11, n=2, max_tokens=9,
                             logprobs=3, ignore_eos=True),
              SamplingParams(temperature=1.0, min_p=0.05, max_tokens=7, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=8, logprobs=1)]
    first = demo_lora_requests(assets[1])[0]
    _both(monkeypatch, _demo(assets), PROMPTS[:3], params, [first, None, None])


def test_stops_eos_and_min_tokens(assets, monkeypatch):
    free = _demo(assets)().generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12,
                                                            ignore_eos=True), use_tqdm=False)
    texts = [o.outputs[0].text for o in free]
    tokens = [o.outputs[0].token_ids for o in free]
    params = [SamplingParams(temperature=0.0, max_tokens=12, stop=[texts[0][3:5]]),
              SamplingParams(temperature=0.0, max_tokens=12, stop=[texts[1][4:7]],
                             include_stop_str_in_output=True),
              SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[tokens[2][5]]),
              SamplingParams(temperature=0.0, max_tokens=12, min_tokens=4,
                             stop_token_ids=[tokens[3][1]]),
              SamplingParams(temperature=0.7, seed=3, max_tokens=30)]  # EOS may end it
    engine = _both(monkeypatch, _demo(assets), PROMPTS, params)
    assert engine.stats["generation_tokens"] > 0


def test_penalties_run_one_step_at_a_time_with_the_same_tokens(assets, monkeypatch):
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                             repetition_penalty=1.3),
              SamplingParams(temperature=0.9, seed=5, max_tokens=10, ignore_eos=True,
                             frequency_penalty=0.5, presence_penalty=0.2),
              SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)]
    _both(monkeypatch, _demo(assets), PROMPTS[:3], params, overlaps=False)


def test_the_models_length_limit(assets, monkeypatch):
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)  # to the limit
    _both(monkeypatch, _demo(assets, max_model_len=24), PROMPTS[:3], params)


def test_preemption_and_prefix_caching(assets, monkeypatch):
    model_dir, _ = assets
    roomy = LLM(model=model_dir, device="cpu", pool_memory_bytes=64 << 20)
    page, layers = roomy.llm_engine.memory.page_bytes, roomy.llm_engine.model.config.num_layers
    prompts = [f"request number {i} " * 3 for i in range(6)] + ["request number 0 " * 3]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine = _both(monkeypatch, lambda: LLM(model=model_dir, device="cpu",
                                            pool_memory_bytes=12 * layers * page,
                                            enable_prefix_caching=True),
                   prompts, params)
    assert engine.stats["preemptions"] > 0


def test_an_abort_while_its_step_is_in_flight(assets, monkeypatch):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    loras = demo_lora_requests(assets[1])
    want, _ = _run(monkeypatch, False, _demo(assets), PROMPTS[:3], params, [loras[0], None,
                                                                            loras[1]])
    engine = _demo(assets)().llm_engine
    engine.config.async_scheduling = True  # read on the first step
    for index, (prompt, lora) in enumerate(zip(PROMPTS[:3], [loras[0], None, loras[1]])):
        engine.add_request(str(index), prompt, params, lora)
    finished = {}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        steps += 1
        if steps == 3:
            assert engine._step_pipeline().busy()  # step 3 runs, its tokens not yet appended
            engine.abort_request("2")  # its pages and adapter wait for the step in flight
    assert sorted(finished) == ["0", "1"]
    got = _summary([finished["0"], finished["1"]])
    assert got[0] == want[0][:2]
    assert engine.memory.pool.stats()["kv_pages"] == 0
    assert engine.memory.pool.stats()["pinned_adapter_pages"] == 0
    assert engine.kv.deferred_frees == 0


def test_tokens_are_appended_one_step_later(assets, monkeypatch):
    engine = _demo(assets)().llm_engine
    engine.config.async_scheduling = True  # read on the first step
    engine.add_request("a", "Roses are red", SamplingParams(temperature=0.0, max_tokens=3,
                                                            ignore_eos=True))
    seq = engine._requests["a"].seqs[0]
    assert engine.step() == []  # the prefill and its sampling were launched, nothing waited
    assert seq.num_pending_tokens == 1 and seq.output_token_ids == []
    outputs = engine.step()  # launches token 2's step, then appends token 1
    assert [o.outputs[0].token_ids for o in outputs] == [seq.output_token_ids]
    assert len(seq.output_token_ids) == 1 and seq.num_pending_tokens == 1
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert outputs[0].finished and len(outputs[0].outputs[0].token_ids) == 3


def test_a_failing_adapter_fails_only_its_requests(monkeypatch, tmp_path):
    probe = make_llm()
    good = LoRARequest("good", 1, write_adapter(probe, tmp_path / "good", seed=1))
    bad_dir = write_adapter(probe, tmp_path / "bad", seed=2)
    poison(bad_dir, float("nan"))
    bad = LoRARequest("bad", 2, bad_dir)
    prompt = {"prompt_token_ids": [3, 14, 15, 92, 65]}
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want, _ = _run(monkeypatch, False, make_llm, [prompt] * 3, params, [good, bad, None])
    llm = make_llm()
    llm.llm_engine.config.async_scheduling = True  # read on the first step
    start = accounts(llm)
    got = _summary(llm.generate([prompt] * 3, params, [good, bad, None], use_tqdm=False))
    _same(got, want)
    assert got[0][1][3] == "error" and got[0][1][6] == "adapter_error"
    assert accounts(llm) == start


def test_a_prefill_takes_its_pending_token_from_the_last_steps_tokens(assets):
    """A sequence preempted while its token was in flight is recomputed with that token: the
    prefill's last id is read from the previous step's sampled tensor, on the device."""
    model_dir, _ = assets
    engine = LLM(model=model_dir, device="cpu").llm_engine
    prompt = engine.tokenizer.encode("Roses are red")
    known = Sequence(seq_id=1000, request_id="k", index=0, prompt_token_ids=prompt,
                     params=SamplingParams(), adapter_id=None, arrival_time=0.0,
                     output_token_ids=[101])
    pending = Sequence(seq_id=1001, request_id="p", index=0, prompt_token_ids=prompt,
                       params=SamplingParams(), adapter_id=None, arrival_time=0.0,
                       num_pending_tokens=1)
    length = len(prompt) + 1
    assert engine.kv.reserve(known, length) and engine.kv.reserve(pending, length)
    with torch.inference_mode():
        want = engine.runner.execute(ScheduledBatch([known], [length]), {})
        batch = ScheduledBatch([pending], [length])
        with pytest.raises(RuntimeError, match="tokens the host does not have"):
            engine.runner.prepare(batch, {})
        step = engine.runner.prepare(batch, {}, pending={pending.seq_id: 1})
        got = engine.runner.logits(engine.runner.forward(step, torch.tensor([7, 101])))
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(got.argmax(-1), want.argmax(-1))
    engine.kv.free(known)
    engine.kv.free(pending)


@pytest.mark.gpu
@pytest.mark.parametrize("decode_graphs", [True, False])
def test_gpu_async_engine_matches_the_synchronous_one(assets, monkeypatch, decode_graphs):
    """bfloat16 on a GPU, with and without decode graphs: the same tokens, text and stops,
    steps launched while the previous one runs."""
    loras = demo_lora_requests(assets[1])
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=20, logprobs=2,
                             ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=30, stop=["e"]),
              SamplingParams(temperature=0.9, seed=8, n=2, max_tokens=16),
              SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.2)]
    make_engine = _demo(assets, device="cuda", dtype="bfloat16", decode_graphs=decode_graphs,
                        pool_memory_bytes=256 << 20, max_loras=4)

    def make():
        # Every adapter resident before the first step: which step a load lands on must not
        # decide which rows share a step (a step of one row takes cuBLAS's GEMV, other bits).
        llm = make_engine()
        for lora in loras[:4]:
            llm.llm_engine.adapters.preload(lora)
        return llm

    # An async step N+1 still computes a sequence that stopped on step N's token, so the two
    # engines' steps can hold different numbers of rows. A row's bfloat16 expert sums stay the
    # same only while its expert GEMM does not change with the step's size: one plan row (the
    # tiled kernel, whose sums per row do not depend on the block) and no split-K. The same for
    # attention: graphs address the whole block table, so their split-KV factor grows with the
    # keys it could hold and shrinks with the bucket; one split keeps a row's sums per bucket.
    monkeypatch.setitem(moe_ops.GEMM_PLAN, "dense", ((math.inf, "tensor_core", 8),))
    monkeypatch.setattr(moe_ops, "SPLIT_BELOW_WAVES", 0.0)
    monkeypatch.setattr(moe_ops, "SPLIT_BELOW_WAVES_DENSE", 0.0)
    one_split = PlanOverrides.parse("attention_splits=1")
    make_context = PagedContext.__init__
    monkeypatch.setattr(PagedContext, "__init__",
                        lambda self, meta, kv_view, lora_views, overrides=None:
                        make_context(self, meta, kv_view, lora_views, one_split))
    engine = _both(monkeypatch, make, PROMPTS, params, [None, *loras[:4]], tolerance=1e-2)
    if decode_graphs:
        assert engine.runner.graphs.replays > 0 and engine.runner.graphs.capture_error is None
