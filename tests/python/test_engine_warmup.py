"""The start-up warm-up of moelora.engine.warmup: which passes it runs, and that they touch
nothing an engine holds (pool bytes: KV of running sequences and adapter rows; block tables)
while they launch what a prompt chunk launches (LoRA ops with adapters, prefill spans)."""

from __future__ import annotations

import pathlib

import pytest
import torch
from engine_steps import finished_tokens
from moelora import _C, LLM, SamplingParams
from moelora.engine.warmup import adapter_counts, eager_step_sizes, warm_up_eager_steps
from test_step_graphs import _count_lora_launches, mixtral  # noqa: F401  (fixture)

CUDA_SOURCES = sorted((pathlib.Path(__file__).parents[2] / "cuda").rglob("*.cu"))


def test_every_cuda_source_names_its_kernel_module():
    """preload_cuda_kernels loads the modules that MOELORA_KERNEL_MODULE() registered: a .cu
    file without it would leave its kernels to load on first launch."""
    assert len(CUDA_SOURCES) > 20
    for path in CUDA_SOURCES:
        text = path.read_text()
        assert text.count("\nMOELORA_KERNEL_MODULE()\n") == 1, path
        assert '#include "common/kernel_modules.cuh"' in text, path


@pytest.mark.skipif(_C.built_with_cuda(), reason="the build without CUDA refuses")
def test_preloading_kernels_without_a_cuda_backend_names_why():
    with pytest.raises(_C.CudaError, match="no CUDA backend"):
        _C.preload_cuda_kernels()


@pytest.mark.gpu
def test_gpu_preload_loads_every_kernel_of_every_module_once():
    with torch.cuda.device(0):
        first = _C.preload_cuda_kernels()
        again = _C.preload_cuda_kernels()
    assert first["modules"] == len(CUDA_SOURCES)
    assert first["kernels"] > 4 * first["modules"]  # template instances, not just the anchors
    assert again == {**first, "newly_loaded": 0}


def test_sizes_are_the_smallest_and_largest_eager_steps():
    assert eager_step_sizes(2048, 256) == [257, 2048]
    assert eager_step_sizes(2048, None) == [1, 2048]
    assert eager_step_sizes(257, 256) == [257]
    assert eager_step_sizes(256, 256) == []  # every step has a graph


def test_adapter_counts_cover_one_and_the_most_a_step_holds():
    assert adapter_counts(False, 8) == [None]
    assert adapter_counts(True, 8) == [None, 1, 8]
    assert adapter_counts(True, 1) == [None, 1]


def _engine(model_dir):
    return LLM(model=model_dir, device="cpu", dtype="float32", enable_lora=True,
               max_lora_rank=8, max_loras=2, max_num_seqs=4, block_size=4,
               pool_memory_bytes=16 << 20).llm_engine


def test_warm_up_changes_nothing_in_the_pool_and_launches_lora(mixtral, monkeypatch):  # noqa: F811
    model_dir, adapters = mixtral
    engine = _engine(model_dir)
    engine.adapters.preload(adapters[0])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request("a", [5, 6, 7, 8, 9], params, adapters[0])
    for _ in range(3):  # the request is mid-flight: its KV and its adapter's rows are in the pool
        engine.step()
    runner = engine.runner
    arena = engine.memory.arena.clone()
    table = runner.tables.table.clone()
    calls = _count_lora_launches(monkeypatch)
    spans = []
    from moelora.engine import paged_context
    original = paged_context.attend_spans
    monkeypatch.setattr(paged_context, "attend_spans",
                        lambda *a, **k: (spans.append(len(a[3])), original(*a, **k))[1])

    passes = warm_up_eager_steps(runner, [3, 300], [None, 1, 2], sample_rows=4)

    assert passes == 6
    assert calls["lora"] > 0
    assert spans and max(spans) == 2  # 300 tokens: two prompt chunks of 256 and 44
    assert torch.equal(engine.memory.arena, arena)
    assert torch.equal(runner.tables.table, table)
    # the request goes on to the tokens of an engine that never warmed up
    reference = _engine(model_dir)
    reference.adapters.preload(adapters[0])
    reference.add_request("a", [5, 6, 7, 8, 9], params, adapters[0])
    assert finished_tokens(engine) == finished_tokens(reference)


def test_cpu_engines_do_not_warm_up(mixtral):  # noqa: F811
    assert _engine(mixtral[0]).executor.worker.warmup_passes == 0


@pytest.mark.gpu
def test_gpu_engine_warms_up_every_eager_size_when_it_starts(mixtral):  # noqa: F811
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    model_dir, adapters = mixtral
    engine = LLMEngine(EngineConfig(model_dir, device="cuda", dtype="bfloat16", enable_lora=True,
                                    max_lora_rank=8, max_loras=2, max_num_seqs=4, block_size=4,
                                    max_num_batched_tokens=512, max_cudagraph_capture_size=64,
                                    pool_memory_bytes=64 << 20, decode_graphs=True))
    assert engine.executor.worker.warmup_passes == 2 * 3  # sizes 65 and 512, 0 / 1 / 2 adapters
    assert engine.memory.pool.stats()["kv_pages"] == 0
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("long", list(range(3, 203)), params, adapters[0])
    assert len(finished_tokens(engine)["long"]) == 6
