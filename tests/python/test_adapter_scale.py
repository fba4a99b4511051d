"""Many adapters through few device slots and host copies, on the CPU engine (real files, real
reader and copy threads):

- churn: 16 adapters, 3 slots, 5 host copies, zipf-popular requests arriving in waves; every
  request's greedy tokens equal those of an engine that holds every adapter at once, and the
  pool's page accounts are exact at the end;
- metrics: loads, evictions, arrivals and the per-tier load latency histograms add up;
- preload_all: the server's eager start-up load of --lora-modules;
- faults in the middle of a parallel read (a file truncated under the reader, a failed read, a
  directory replaced by a file): that adapter's requests fail naming the adapter and the file
  (no directory), every other request completes, accounts are exact, and the adapter loads again
  once reloaded from good files."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from engine_steps import finish_all
from moelora import LLM, AdapterValidationError, LoRARequest, SamplingParams
from moelora.bench.synthetic_adapters import write_random_adapter
from test_adapter_faults import make_llm as fault_test_llm

PARAMS = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
NUM_ADAPTERS = 16


def make_llm(**overrides) -> LLM:
    """test_adapter_faults' engine with three device slots and five host copies."""
    options = {"max_loras": 3, "max_cpu_loras": 5, "pool_memory_bytes": 48 << 20}
    return fault_test_llm(**{**options, **overrides})


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_adapters")
    with make_llm(enable_lora=True) as llm:
        sites = llm.llm_engine.model.lora_sites()
    return [write_random_adapter(str(root / f"a{i}"), sites, 2 + 2 * (i % 4), seed=i,
                                 dtype=torch.float32 if i % 2 else torch.bfloat16)
            for i in range(NUM_ADAPTERS)]


def lora(dirs, i: int) -> LoRARequest:
    return LoRARequest(f"a{i}", i + 1, dirs[i])


def workload(dirs, n: int = 48, seed: int = 0):
    """Zipf(1.0)-popular adapters (and some base requests), distinct prompts."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(NUM_ADAPTERS)]
    prompts, loras = [], []
    for k in range(n):
        prompts.append({"prompt_token_ids": [3 + k % 50, 14, 15 + k % 7, 92, 65]})
        loras.append(None if k % 8 == 7 else
                     lora(dirs, rng.choices(range(NUM_ADAPTERS), weights)[0]))
    return prompts, loras


def accounts(llm: LLM) -> dict:
    engine = llm.llm_engine
    pool = engine.memory.pool
    pool.check_invariants()
    stats = pool.stats()
    adapters = engine.adapters
    resident = [r for r in adapters.loaded() if adapters.ready(adapters.resolve(r))]
    assert stats["adapter_pages"] == sum(adapters.num_pages(adapters.resolve(r))
                                         for r in resident)
    assert stats["adapter_owners"] == len(resident)
    return {"kv_pages": stats["kv_pages"], "kv_owners": stats["kv_owners"],
            "pinned_adapter_pages": stats["pinned_adapter_pages"],
            "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting)}


IDLE = {"kv_pages": 0, "kv_owners": 0, "pinned_adapter_pages": 0, "running": 0, "waiting": 0}


@pytest.fixture(scope="module")
def reference(adapter_dirs):
    """Every request's tokens from an engine that holds all adapters on the device at once."""
    prompts, loras = workload(adapter_dirs)
    with make_llm(max_loras=NUM_ADAPTERS, max_cpu_loras=NUM_ADAPTERS) as llm:
        outs = llm.generate(prompts, PARAMS, loras, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_churn_through_three_slots_matches_holding_every_adapter(adapter_dirs, reference):
    prompts, loras = workload(adapter_dirs)
    with make_llm() as llm:
        engine = llm.llm_engine
        # Waves: a third of the requests at a time, each wave queued while the last decodes.
        outputs = {}

        def keep(out) -> None:
            if out.finished:
                outputs[int(out.request_id)] = out.outputs[0].token_ids

        wave = len(prompts) // 3
        for start in range(0, len(prompts), wave):
            for k in range(start, min(start + wave, len(prompts))):
                engine.add_request(str(k), prompts[k], PARAMS, loras[k])
            for _ in range(3):
                for out in engine.step():
                    keep(out)
        finish_all(engine, on_output=keep)
        assert [outputs[k] for k in range(len(prompts))] == reference
        assert accounts(llm) == IDLE

        metrics = engine.adapters.metrics()
        used = {r.lora_name for r in loras if r is not None}
        assert metrics["loads"]["device"] > 3  # more adapters than slots: they took turns
        assert metrics["loads"]["device"] >= len(used)
        assert metrics["evictions"]["device"] >= metrics["loads"]["device"] - 3
        assert metrics["loads"]["host"] >= len(used)
        assert sum(metrics["arrivals"].values()) == sum(r is not None for r in loras)
        assert metrics["arrivals"]["failed"] == 0
        for tier in ("host", "device"):
            histogram = metrics["load_seconds"][tier]
            assert histogram["buckets"][-1] == ("+Inf", metrics["loads"][tier])
            assert histogram["count"] == metrics["loads"][tier] and histogram["sum"] > 0
            counts = [count for _, count in histogram["buckets"]]
            assert counts == sorted(counts)  # cumulative
        assert metrics["bytes"]["disk_to_host"] > 0 and metrics["bytes"]["host_to_device"] > 0
        stats = engine.adapters.stats()
        assert stats["host_copies"] <= 5 and stats["on_device"] <= 3
        assert stats["host_buffers_in_use"] == stats["host_copies"]


def test_preload_all_fills_the_slots_then_the_host_tier(adapter_dirs, tmp_path):
    with make_llm() as llm:
        adapters = llm.llm_engine.adapters
        requests = [lora(adapter_dirs, i) for i in range(7)]
        tiers = adapters.preload_all(requests)
        assert [tiers[r.lora_name] for r in requests] == ["device"] * 3 + ["host"] * 2 + \
            ["disk"] * 2
        assert adapters.metrics()["loads"] == {"host": 5, "device": 3}
        # A bad module among good ones: the good ones load, the bad one raises and is gone.
        bad_dir = str(tmp_path / "bad")
        shutil.copytree(adapter_dirs[9], bad_dir)
        file = os.path.join(bad_dir, "adapter_model.safetensors")
        os.truncate(file, os.path.getsize(file) // 3)
        with pytest.raises(AdapterValidationError, match=r"'bad'") as caught:
            adapters.preload_all([lora(adapter_dirs, 8), LoRARequest("bad", 99, bad_dir)],
                                 up_to=1)
        assert str(tmp_path) not in str(caught.value)
        assert "bad" not in [r.lora_name for r in adapters.loaded()]
        assert adapters.ready(adapters.resolve(lora(adapter_dirs, 8)))
        assert accounts(llm) == IDLE


def _truncate_mid_read(file: str):
    def hook(adapter: str, file_index: int, chunk: int) -> None:
        if adapter == "victim" and chunk == 0:
            os.truncate(file, 4096)
    return hook


def _fail_read(adapter: str, file_index: int, chunk: int) -> None:
    if adapter == "victim":
        raise OSError("injected read failure")


@pytest.mark.parametrize("fault", ["truncated_mid_read", "read_fails", "dir_replaced"])
def test_a_fault_mid_read_fails_that_adapter_alone(adapter_dirs, tmp_path, fault):
    victim_dir = str(tmp_path / "victim")
    shutil.copytree(adapter_dirs[3], victim_dir)
    file = os.path.join(victim_dir, "adapter_model.safetensors")
    original = Path(file).read_bytes()
    prompts, loras = workload(adapter_dirs, n=12, seed=1)
    victim = LoRARequest("victim", 77, victim_dir)
    with make_llm() as llm:
        engine = llm.llm_engine
        adapters = engine.adapters
        adapters.resolve(victim)  # registered: headers checked, no weight read yet
        if fault == "truncated_mid_read":
            adapters.cache._set_read_hook(_truncate_mid_read(file))
        elif fault == "read_fails":
            adapters.cache._set_read_hook(_fail_read)
        else:
            os.rename(victim_dir, victim_dir + ".moved")
            with open(victim_dir, "w") as f:
                f.write("not a directory")
        outs = llm.generate(prompts[:6] + [prompts[6]] + prompts[6:],
                            PARAMS, loras[:6] + [victim] + loras[6:], use_tqdm=False)
        adapters.cache._set_read_hook(None)
        failed = outs[6].outputs[0]
        assert failed.finish_reason == "error" and failed.error_type == "adapter_error"
        assert "adapter 'victim'" in failed.error
        expected = {"truncated_mid_read": "'adapter_model.safetensors' was truncated while it "
                                          "was read",
                    "read_fails": "injected read failure",
                    "dir_replaced": "'adapter_model.safetensors' is gone"}[fault]
        assert expected in failed.error
        assert str(tmp_path) not in failed.error
        others = [o.outputs[0] for k, o in enumerate(outs) if k != 6]
        assert all(o.finish_reason == "length" and o.error_type is None for o in others)
        assert "victim" not in [r.lora_name for r in adapters.loaded()]
        assert adapters.metrics()["arrivals"]["failed"] == 0  # it failed after arriving
        assert adapters.stats()["host_buffers_in_use"] == adapters.stats()["host_copies"]
        assert accounts(llm) == IDLE
        # Still failed for later requests until reloaded; reloaded from good files, it serves.
        again = llm.generate(prompts[0], PARAMS, victim, use_tqdm=False)[0].outputs[0]
        assert again.finish_reason == "error"
        if fault == "dir_replaced":
            os.remove(victim_dir)
            os.rename(victim_dir + ".moved", victim_dir)
        else:
            Path(file).write_bytes(original)
        adapters.unload("victim")
        adapters.preload(victim)
        good = llm.generate(prompts[0], PARAMS, victim, use_tqdm=False)[0].outputs[0]
        assert good.finish_reason == "length"
        assert accounts(llm) == IDLE


@pytest.mark.gpu
def test_gpu_churn_through_two_slots_matches_holding_every_adapter(adapter_dirs):
    """Churn on the GPU: page-locked host copies, the CUDA copy engine's batched copies on its
    own streams, decode graphs on. One request at a time, so both engines run the same batch
    shapes (bf16 kernels need not agree across shapes): tokens equal an engine holding every
    adapter."""
    prompts, loras = workload(adapter_dirs, n=24, seed=2)
    options = {"device": "cuda", "dtype": "bfloat16", "pool_memory_bytes": 256 << 20}

    def one_at_a_time(llm):
        return [llm.generate(p, PARAMS, r, use_tqdm=False)[0].outputs[0].token_ids
                for p, r in zip(prompts, loras)]

    with make_llm(max_loras=NUM_ADAPTERS, max_cpu_loras=NUM_ADAPTERS, **options) as llm:
        llm.llm_engine.adapters.preload_all([lora(adapter_dirs, i) for i in range(NUM_ADAPTERS)])
        reference = one_at_a_time(llm)
    with make_llm(max_loras=2, max_cpu_loras=4, **options) as llm:
        assert one_at_a_time(llm) == reference
        metrics = llm.llm_engine.adapters.metrics()
        assert metrics["loads"]["device"] > 2
        assert metrics["load_seconds"]["device"]["count"] == metrics["loads"]["device"]
        assert accounts(llm) == IDLE
