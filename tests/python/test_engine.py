"""Engine behaviour on the demo's tiny Mixtral checkpoint (with a tokenizer) and its PEFT
adapters: prompts of every form, sampling options, preemption under memory pressure, more
adapters than device slots, and failures that stay with their own requests."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from moelora import LLM, LoRARequest, SamplingParams
from moelora.demo.assets import ADAPTERS, demo_lora_requests
from safetensors.torch import load_file, save_file

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(assets):
    model_dir, _ = assets
    return LLM(model=model_dir, device="cpu", enable_lora=True, max_lora_rank=16, max_loras=2,
               max_cpu_loras=len(ADAPTERS))


def test_prompt_forms_agree(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("Hello world")
    by_text, by_ids, by_list = llm.generate(["Hello world", {"prompt_token_ids": ids}, ids],
                                            GREEDY, use_tqdm=False)
    assert by_text.prompt_token_ids == ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids \
        == by_list.outputs[0].token_ids
    assert by_text.outputs[0].text == tok.decode(by_text.outputs[0].token_ids)
    assert by_text.outputs[0].finish_reason == "length"


def test_adapters_change_outputs_and_batching_does_not(llm, assets):
    loras = demo_lora_requests(assets[1])
    prompt = "Once upon a time"
    mixed = llm.generate([prompt] * (len(loras) + 1), GREEDY, lora_request=[None] + loras,
                         use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in mixed]
    assert len({tuple(t) for t in tokens}) >= 4, "adapters should change greedy outputs"
    # Each request alone gives the same tokens as in the mixed batch.
    for lora, expected in zip([None] + loras, tokens):
        alone = llm.generate(prompt, GREEDY, lora_request=lora, use_tqdm=False)
        assert alone[0].outputs[0].token_ids == expected


def test_more_adapters_than_slots_load_and_evict(llm, assets):
    loras = demo_lora_requests(assets[1])  # 5 adapters, 2 device slots
    before = llm.llm_engine.adapters.stats()
    outs = llm.generate(["abc"] * 10, GREEDY, lora_request=[loras[i % 5] for i in range(10)],
                        use_tqdm=False)
    assert all(o.finished and len(o.outputs[0].token_ids) == 6 for o in outs)
    after = llm.llm_engine.adapters.stats()
    assert after["device_evictions"] > before["device_evictions"]
    assert after["device_loads"] >= before["device_loads"] + 3


def test_sampling_seed_is_reproducible_and_n_gives_distinct_samples(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=7, n=3,
                            ignore_eos=True)
    first = llm.generate("The sea", params, use_tqdm=False)[0]
    again = llm.generate("The sea", params, use_tqdm=False)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1


def test_stop_token_ids_and_logprobs(llm):
    free = llm.generate("Roses", GREEDY, use_tqdm=False)[0].outputs[0]
    stop_at = free.token_ids[2]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                            stop_token_ids=[stop_at], logprobs=3)
    out = llm.generate("Roses", params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert len(entry) == 3


def test_stop_strings_cut_the_text(llm):
    free = llm.generate("Roses", GREEDY, use_tqdm=False)[0].outputs[0]
    stop = free.text[2:4]
    if not stop.strip():
        pytest.skip("greedy text has no printable stop candidate")
    out = llm.generate("Roses", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                               stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert stop not in out.text and free.text.startswith(out.text)
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids == tok.encode(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


def test_preemption_under_a_small_pool_gives_the_same_tokens(assets):
    model_dir, _ = assets
    prompts = [f"request number {i} " * 3 for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    roomy = LLM(model=model_dir, device="cpu", pool_memory_bytes=64 << 20)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    page = roomy.llm_engine.memory.page_bytes
    layers = roomy.llm_engine.model.config.num_layers
    # Room for about 12 blocks of 16 tokens: less than the 6 requests need together.
    tight = LLM(model=model_dir, device="cpu", pool_memory_bytes=12 * layers * page)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert tight.llm_engine.stats["preemptions"] > 0
    assert tight.llm_engine.memory.pool.stats()["kv_pages"] == 0


def test_a_request_longer_than_the_pool_is_refused_up_front(assets):
    model_dir, _ = assets
    llm = LLM(model=model_dir, device="cpu", pool_memory_bytes=1 << 20)
    capacity = llm.llm_engine.kv.capacity_tokens()
    with pytest.raises(ValueError, match=rf"prompt 0: .*room for at most {capacity} tokens"):
        llm.generate([{"prompt_token_ids": [5] * (capacity + 10)}, "short"],
                     SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # nothing of the call was queued
    out = llm.generate("short", SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert out[0].outputs[0].finish_reason in ("length", "stop")


def test_bad_adapters_are_refused_or_fail_only_their_requests(llm, assets, tmp_path):
    _, dirs = assets
    # Refused at registration: a rank above max_lora_rank is named in the error.
    big = tmp_path / "big"
    shutil.copytree(dirs["coder"], big)
    cfg = json.loads((big / "adapter_config.json").read_text())
    cfg["r"] = 32
    tensors = load_file(str(big / "adapter_model.safetensors"))
    tensors = {k: torch.cat([v, v], dim=0 if "lora_A" in k else 1) for k, v in tensors.items()}
    save_file(tensors, str(big / "adapter_model.safetensors"))
    (big / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rank"):
        llm.generate("x", GREEDY, lora_request=LoRARequest("big", 90, str(big)), use_tqdm=False)
    # NaN weights pass the header check but fail the load: only that adapter's requests fail.
    nan = tmp_path / "nan"
    shutil.copytree(dirs["chef"], nan)
    tensors = load_file(str(nan / "adapter_model.safetensors"))
    key = min(tensors)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    good = demo_lora_requests(assets[1])[0]
    outs = llm.generate(["a", "b", "c"], GREEDY,
                        lora_request=[good, LoRARequest("nan", 91, str(nan)), None],
                        use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error"
    assert "nan" in outs[1].outputs[0].error.lower()
    assert outs[0].outputs[0].finish_reason == "length"
    assert outs[2].outputs[0].finish_reason == "length"
    assert os.path.exists(nan)


def test_an_adapter_is_not_starved_by_a_stream_of_others(assets):
    """One device slot, one adapter per batch, and a never-ending stream of requests on adapter
    A: a request on adapter B still runs (the scheduler stops admitting A's once B starves)."""
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    model_dir, dirs = assets
    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", enable_lora=True,
                                    max_lora_rank=16, max_loras=1, max_cpu_loras=2,
                                    load_progress=False))
    engine.scheduler.config.starvation_steps = 8
    a, b = LoRARequest("poet", 1, dirs["poet"]), LoRARequest("chef", 2, dirs["chef"])
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"a{i}", "abc", params, a)
    engine.add_request("b", "abc", params, b)
    finished_b_at = None
    for step in range(300):
        engine.add_request(f"more{step}", "abc", params, a)  # A never stops arriving
        if any(o.request_id == "b" and o.finished for o in engine.step()):
            finished_b_at = step
            break
    assert finished_b_at is not None, "adapter B starved behind a stream of adapter A"
