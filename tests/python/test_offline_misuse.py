"""The offline API misused: a bad LoRARequest or SamplingParams in a batch, logprobs past
max_logprobs, non-finite sampling values, a prompt the pool can never hold, and an exception
inside a step. A generate call is atomic (nothing of a refused call is queued, the error names
the bad entry's index), a failed step fails only its own requests, and the LLM keeps serving:
after each case no sequence is left running or waiting and the page accounts are as before."""

from __future__ import annotations

import math

import pytest
from moelora import LoRARequest, SamplingParams
from test_adapter_faults import PARAMS, PROMPT, accounts, make_llm, write_adapter


@pytest.fixture(scope="module")
def llm():
    with make_llm() as engine:
        yield engine


def test_a_bad_lora_request_in_a_batch_queues_nothing(llm, tmp_path):
    start = accounts(llm)
    good = LoRARequest("fine", 1, write_adapter(llm, tmp_path / "fine"))
    bad = LoRARequest("missing", 2, str(tmp_path / "no_such_adapter"))
    with pytest.raises(ValueError, match=r"^prompt 2: .*'missing'"):
        llm.generate([PROMPT] * 4, PARAMS, [good, None, bad, None], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt 1: lora_request must be a LoRARequest"):
        llm.generate([PROMPT, PROMPT], PARAMS, [None, "fine"], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert accounts(llm) == start
    # The next call runs exactly its own requests.
    outs = llm.generate([PROMPT, PROMPT], PARAMS, [good, None], use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "length"]
    assert llm.llm_engine.stats.get("failed_steps", 0) == 0


def test_logprobs_are_capped_at_max_logprobs_before_anything_runs(llm):
    start = accounts(llm)
    with pytest.raises(ValueError, match=r"^prompt 1: logprobs=1000 exceeds .*max_logprobs \(20"):
        llm.generate([PROMPT, PROMPT], [PARAMS, SamplingParams(logprobs=1000)], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs=21"):
        llm.generate(PROMPT, SamplingParams(prompt_logprobs=21), use_tqdm=False)
    assert accounts(llm) == start
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3, logprobs=20),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 3 and all(len(entry) >= 20 for entry in out.logprobs)
    assert accounts(llm) == start


def test_max_logprobs_is_raised_by_the_llm():
    with make_llm(enable_lora=False, max_logprobs=40) as roomy:
        out = roomy.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=2, logprobs=30),
                             use_tqdm=False)[0].outputs[0]
        assert all(len(entry) >= 30 for entry in out.logprobs)
        with pytest.raises(ValueError, match="max_logprobs"):
            roomy.generate(PROMPT, SamplingParams(logprobs=41), use_tqdm=False)


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.5),
    ("top_p", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("min_p", math.nan),
    ("presence_penalty", math.inf), ("frequency_penalty", -3.0), ("repetition_penalty", math.nan),
    ("repetition_penalty", 0.0), ("n", 0), ("n", 10**6), ("n", 1.5), ("max_tokens", 0),
    ("max_tokens", "8"), ("min_tokens", -1), ("logprobs", -1), ("logprobs", True),
    ("prompt_logprobs", -2), ("seed", "7"), ("seed", 1 << 70), ("top_k", -2),
    ("logit_bias", {"1" * 5000: 1.0}), ("logit_bias", {5: math.nan}), ("logit_bias", {-1: 1.0}),
    ("stop", ""), ("stop", [1]), ("stop_token_ids", [-1]), ("ignore_eos", "yes"),
])
def test_sampling_params_refuse_bad_values_at_construction(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_token_ids_outside_the_vocabulary_are_refused_before_queueing(llm):
    vocab = llm.llm_engine.model.config.vocab_size
    with pytest.raises(ValueError, match=r"prompt 1: logit_bias token id"):
        llm.generate([PROMPT, PROMPT], [PARAMS, SamplingParams(logit_bias={vocab: 1.0})],
                     use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt 0: stop_token_ids"):
        llm.generate(PROMPT, SamplingParams(stop_token_ids=[vocab + 3]), use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt 0: prompt token ids"):
        llm.generate({"prompt_token_ids": [1, vocab]}, PARAMS, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_prompt_the_pool_can_never_hold_is_refused_with_the_numbers(tmp_path):
    with make_llm(pool_memory_bytes=2 << 20) as small:
        engine = small.llm_engine
        pages = engine.memory.pool.num_pages
        capacity = engine.kv.max_tokens_within(pages)
        assert capacity == engine.kv.capacity_tokens()  # no sliding windows in this model
        fits = {"prompt_token_ids": [7] * (capacity - 8)}
        out = small.generate(fits, SamplingParams(max_tokens=8, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "length"
        with pytest.raises(ValueError, match=rf"max_tokens \(9\) needs \d+ pages of KV cache; "
                                             rf"the page pool holds {pages} pages, room for at "
                                             rf"most {capacity} tokens"):
            small.generate(fits, SamplingParams(max_tokens=9), use_tqdm=False)
        # Beside its adapter it cannot fit: that request alone fails, as an invalid request.
        lora = LoRARequest("roomy", 1, write_adapter(small, tmp_path / "roomy"))
        crowded = small.generate([fits, fits], SamplingParams(max_tokens=8, ignore_eos=True),
                                 [lora, None], use_tqdm=False)
        assert crowded[0].outputs[0].finish_reason == "error"
        assert crowded[0].outputs[0].error_type == "invalid_request"
        assert "beside its adapter's" in crowded[0].outputs[0].error
        assert crowded[1].outputs[0].finish_reason == "length"
        # Without max_tokens a request is bounded by the pool: it ends with "length".
        unbounded = small.generate({"prompt_token_ids": [7] * (capacity - 3)},
                                   SamplingParams(max_tokens=None, ignore_eos=True),
                                   use_tqdm=False)[0].outputs[0]
        assert unbounded.finish_reason == "length" and len(unbounded.token_ids) == 3


def test_the_sliding_window_capacity_counts_only_the_window(llm):
    from moelora.engine.kv_manager import KVManager

    pool = llm.llm_engine.memory.pool
    windows = KVManager(pool, 4, 16, (None, 64, None, 64))
    assert windows.min_pages_for(16 * 100) == 100 * 2 + 4 * 2
    assert windows.max_tokens_within(208) == 1600
    assert KVManager(pool, 2, 16, (32, 32)).max_tokens_within(4) is None


def test_an_exception_inside_a_step_fails_that_step_and_the_llm_keeps_serving(llm, tmp_path):
    start = accounts(llm)
    engine = llm.llm_engine
    lora = LoRARequest("stepper", 1, write_adapter(llm, tmp_path / "stepper"))
    model_forward = type(engine.model).forward
    calls = {"n": 0}

    def failing_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure inside the forward pass")
        return model_forward(self, *args, **kwargs)

    type(engine.model).forward = failing_once
    try:
        outs = llm.generate([PROMPT] * 3, PARAMS, [lora, None, lora], use_tqdm=False)
    finally:
        type(engine.model).forward = model_forward
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert "error" in reasons
    for out in outs:
        if out.outputs[0].finish_reason == "error":
            assert out.outputs[0].error_type == "internal_error"
            assert "RuntimeError" in out.outputs[0].error
    assert engine.stats["failed_steps"] == 1
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert accounts(llm) == start
    later = llm.generate([PROMPT, PROMPT], PARAMS, [lora, None], use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in later] == ["length", "length"]
    assert accounts(llm) == start


def test_vllm_arguments_are_accepted():
    with make_llm(enable_lora=False, pool_memory_bytes=None, kv_cache_memory_bytes=8 << 20,
                  trust_remote_code=True) as llm:
        assert llm.llm_engine.config.pool_memory_bytes == 8 << 20
        assert llm.llm_engine.memory.pool.arena_bytes <= 8 << 20
    with pytest.raises(ValueError, match="contradicts"):
        make_llm(kv_cache_memory_bytes=8 << 20, pool_memory_bytes=16 << 20)
