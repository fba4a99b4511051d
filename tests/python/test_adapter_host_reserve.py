"""Host memory kept ready for adapters' host copies (EngineConfig.adapter_host_reserve_bytes):
made ahead by the cache's idle reader threads, taken block by block by cold loads, made again
as they take it, and without effect on what the engine generates. CPU engine, real reader
threads and PEFT files (on the CPU the blocks are faulted in, not page-locked)."""

from __future__ import annotations

import time

import pytest
import torch
from engine_steps import finished_tokens
from moelora import LoRARequest, SamplingParams
from moelora.bench.synthetic_adapters import write_random_adapter
from moelora.engine import adapters as adapters_module
from moelora.engine.adapters import host_reserve_bytes
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine

BLOCK = 16 << 10
RESERVE = 16 * BLOCK
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def make_engine(**overrides) -> LLMEngine:
    options = {"model": "synthetic:tiny-moe", "device": "cpu", "enable_lora": True,
               "max_lora_rank": 8, "max_loras": 2, "max_cpu_loras": 2,
               "pool_memory_bytes": 32 << 20, "seed": 0, "load_progress": False,
               "adapter_host_block_bytes": BLOCK}
    options.update(overrides)
    return LLMEngine(EngineConfig(**options))


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def generate(engine: LLMEngine, requests) -> dict[str, list[int]]:
    for rid, lora in requests:
        engine.add_request(rid, [3, 14, 15, 92, 65], PARAMS, lora)
    return finished_tokens(engine)


def test_the_reserve_is_made_ahead_taken_by_cold_loads_and_made_again(tmp_path):
    engine = make_engine(adapter_host_reserve_bytes=RESERVE)
    try:
        stats = engine.adapters.stats
        wait_for(lambda: stats()["host_block_bytes_kept"] >= RESERVE)
        kept_before = stats()["host_blocks_kept"]
        made_before = stats()["host_reserve_blocks_made"]
        assert made_before == kept_before  # nothing else was kept yet
        loras = []
        for i in range(3):  # three loads through a host tier of two: one copy is evicted
            path = write_random_adapter(str(tmp_path / f"a{i}"), engine.model.lora_sites(), 8,
                                        seed=i, dtype=torch.float32)
            loras.append(LoRARequest(f"a{i}", i + 1, path))
        generate(engine, [(f"r{i}", lora) for i, lora in enumerate(loras)])
        assert stats()["host_block_bytes_in_use"] > 0
        # Made again after the loads took blocks: as much kept ready as before, or more (the
        # evicted copy's blocks came back).
        wait_for(lambda: stats()["host_block_bytes_kept"] >= RESERVE)
        assert stats()["host_blocks_kept"] >= kept_before
        assert stats()["host_reserve_blocks_made"] > made_before
        assert stats()["host_evictions"] >= 1
    finally:
        engine.shutdown()


def test_the_reserve_changes_no_token(tmp_path):
    tokens = []
    for reserve in (0, RESERVE):
        engine = make_engine(adapter_host_reserve_bytes=reserve)
        try:
            if reserve:
                wait_for(lambda e=engine: e.adapters.stats()["host_block_bytes_kept"] >= RESERVE)
            loras = [LoRARequest(f"a{i}", i + 1,
                                 write_random_adapter(str(tmp_path / f"{reserve}-{i}"),
                                                      engine.model.lora_sites(), 8, seed=i,
                                                      dtype=torch.float32))
                     for i in range(3)]
            tokens.append(generate(engine, [(f"r{i}", lora) for i, lora in enumerate(loras)]
                                   + [("base", None)]))
        finally:
            engine.shutdown()
    assert tokens[0] == tokens[1]


def test_the_automatic_reserve_is_one_largest_adapter_per_device_slot(monkeypatch):
    config = EngineConfig(model="synthetic:tiny-moe", enable_lora=True, max_lora_rank=8,
                          adapter_host_block_bytes=BLOCK, adapter_load_threads=3)
    engine = make_engine(adapter_host_block_bytes=BLOCK, adapter_load_threads=3)
    try:
        sites = engine.model.lora_sites()
        largest = 4 * sum(s.num_layers * s.num_experts * 8 * (s.in_dim + s.out_dim) for s in sites)
        assert largest >= BLOCK
        assert config.device_lora_slots > 3
        assert host_reserve_bytes(config, sites, torch.float32) == (
            config.device_lora_slots * largest)
        few_slots = EngineConfig(model="synthetic:tiny-moe", enable_lora=True, max_lora_rank=8,
                                 max_loras=1, adapter_host_block_bytes=BLOCK,
                                 adapter_load_threads=3)
        assert few_slots.device_lora_slots < 3
        assert host_reserve_bytes(few_slots, sites, torch.float32) == 3 * largest
        # at most an eighth of the machine's memory
        monkeypatch.setattr(adapters_module, "physical_memory_bytes", lambda: 8 * largest)
        assert host_reserve_bytes(config, sites, torch.float32) == largest
        bigger_blocks = EngineConfig(model="synthetic:tiny-moe", enable_lora=True,
                                     max_lora_rank=8, adapter_host_block_bytes=largest + 1)
        assert host_reserve_bytes(bigger_blocks, sites, torch.float32) == 0  # no whole block
        explicit = EngineConfig(model="synthetic:tiny-moe", adapter_host_reserve_bytes=5)
        assert host_reserve_bytes(explicit, sites, torch.float32) == 5
    finally:
        engine.shutdown()


def test_a_bad_reserve_is_refused_by_name():
    with pytest.raises(ValueError, match="adapter_host_reserve_bytes must be >= 0"):
        EngineConfig(model="synthetic:tiny-moe", adapter_host_reserve_bytes=-1)
    with pytest.raises(ValueError, match="adapter_host_reserve_bytes needs adapter_host_block"):
        EngineConfig(model="synthetic:tiny-moe", adapter_host_reserve_bytes=1 << 20,
                     adapter_host_block_bytes=0)
