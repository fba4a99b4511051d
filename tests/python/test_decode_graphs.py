"""Pure-decode steps through the padded static buffers of moelora.engine.decode_graphs.

On the CPU the padded path runs eagerly (no CUDA graph), which is what these tests check: a
batch padded to its bucket (dummy rows: no KV write, no LoRA, one key of page 0) decodes the
same greedy tokens as the unpadded engine, with mixed adapters, several bucket sizes and block
tables wider than some steps need. The GPU variant (marked gpu) captures and replays graphs.
"""

from __future__ import annotations

import argparse
import copy

import peft
import pytest
import torch
from hf_tiny import make_tiny
from moelora import LLM, LoRARequest, SamplingParams
from moelora.engine.decode_graphs import default_buckets
from moelora.entrypoints.llm import _decode_graphs
from moelora.graph_flags import add_graph_arguments, graphs_choice
from test_lora_peft import PEFT_CASES


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert default_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def test_graph_switches_follow_vllm():
    # unset: the device decides (graphs on a one-process CUDA engine); enforce_eager turns them off
    assert _decode_graphs(None, None) is None
    assert _decode_graphs(None, True) is False
    assert _decode_graphs(None, False) is True
    assert _decode_graphs(True, False) is True
    with pytest.raises(ValueError, match="contradicts"):
        _decode_graphs(True, True)
    parser = argparse.ArgumentParser()
    add_graph_arguments(parser)
    assert graphs_choice(parser.parse_args([])) is None
    assert graphs_choice(parser.parse_args(["--enforce-eager"])) is False
    assert graphs_choice(parser.parse_args(["--decode-graphs"])) is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--decode-graphs", "--enforce-eager"])


def test_cpu_engine_runs_eagerly_by_default(mixtral):
    llm = LLM(model=mixtral[0], device="cpu", dtype="float32", pool_memory_bytes=16 << 20)
    assert llm.llm_engine.runner.graphs is None


def _generate(model_dir, adapters, device, dtype, **engine_args):
    llm = LLM(model=model_dir, device=device, dtype=dtype, enable_lora=True, max_lora_rank=8,
              max_loras=2, max_num_seqs=7, block_size=4, pool_memory_bytes=16 << 20,
              **engine_args)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 300, (int(n),), generator=gen).tolist()
               for n in (3, 11, 6, 1, 9, 14, 5)]
    plan = [None, adapters[0], adapters[1], None, adapters[0], adapters[1], adapters[0]]
    # different lengths: sequences finish at different steps, so the batch shrinks through
    # several buckets (7 -> 1)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 2 * i, ignore_eos=True)
              for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                        lora_request=plan, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.llm_engine


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    hf_model, _ = make_tiny("mixtral", root / "model")
    adapters = []
    for index, seed in enumerate((4, 5)):
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
            init_lora_weights=False, **PEFT_CASES["mixtral"]))
        peft_model.save_pretrained(root / f"a{index}")
        adapters.append(LoRARequest(f"a{index}", index + 1, str(root / f"a{index}")))
    return str(root / "model"), adapters


@pytest.mark.parametrize("max_blocks", [16, 3])  # 3: long sequences fall back to eager steps
def test_padded_decode_steps_match_the_eager_engine(mixtral, max_blocks):
    model_dir, adapters = mixtral
    eager, _ = _generate(model_dir, adapters, "cpu", "float32")
    padded, engine = _generate(model_dir, adapters, "cpu", "float32", decode_graphs=True,
                               decode_graph_max_blocks=max_blocks)
    assert padded == eager
    assert engine.runner.graphs is not None
    assert engine.runner.graphs.replays == 0  # no CUDA graphs on the CPU: padded eager passes
    if max_blocks == 16:  # (with 3, most steps hold a longer sequence and run unpadded)
        assert len(engine.runner.graphs._made) >= 3  # the batch shrank through several buckets
    assert engine.memory.pool.stats()["kv_pages"] == 0


@pytest.mark.gpu
def test_cuda_graph_decode_replays_equal_the_padded_eager_passes(mixtral, monkeypatch):
    """Same padded shapes with and without capture: the replays must give the same tokens
    (bfloat16: the MoE base GEMM of float32 syncs the host and cannot be captured)."""
    from moelora.engine import decode_graphs

    model_dir, adapters = mixtral
    graphed, engine = _generate(model_dir, adapters, "cuda", "bfloat16", decode_graphs=True)
    assert engine.runner.graphs.capture_error is None
    assert engine.runner.graphs.replays > 0
    original = decode_graphs.DecodeGraphs.__init__

    def no_capture(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.capture = False

    monkeypatch.setattr(decode_graphs.DecodeGraphs, "__init__", no_capture)
    padded_eager, engine = _generate(model_dir, adapters, "cuda", "bfloat16", decode_graphs=True)
    assert engine.runner.graphs.replays == 0
    assert graphed == padded_eager


def _count_lora_launches(monkeypatch) -> dict:
    """Counts calls of the LoRA ops (each launches kernels on a GPU)."""
    from moelora import ops
    from moelora.engine import paged_context

    calls = {"lora": 0}
    for name in ("dense_lora", "fused_moe_lora", "fused_moe_lora_unsorted", "moe_lora_align"):
        original = getattr(ops, name)

        def counted(*args, _original=original, **kwargs):
            calls["lora"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(paged_context.ops, name, counted)
    return calls


def test_steps_without_adapters_launch_no_lora_and_replay_the_lora_free_graph(mixtral,
                                                                             monkeypatch):
    """A LoRA engine's steps where no token has an adapter: no LoRA op runs, and pure-decode
    steps take the bucket's LoRA-free graph; steps with adapters take the other one."""
    model_dir, adapters = mixtral
    llm = LLM(model=model_dir, device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8,
              max_loras=2, max_num_seqs=4, block_size=4, pool_memory_bytes=16 << 20,
              decode_graphs=True)
    calls = _count_lora_launches(monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    base = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, params, use_tqdm=False)
    graphs = llm.llm_engine.runner.graphs
    assert calls["lora"] == 0 and set(graphs._made) == {(4, False)}
    # resident first, so that the three requests decode together (one bucket) however long the
    # load takes
    llm.llm_engine.adapters.preload(adapters[0])
    llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, params, lora_request=adapters[0],
                 use_tqdm=False)
    assert calls["lora"] > 0 and set(graphs._made) == {(4, False), (4, True)}
    # the LoRA-free graph gives the tokens of an engine without LoRA
    plain = LLM(model=model_dir, device="cpu", dtype="float32", block_size=4,
                pool_memory_bytes=16 << 20)
    assert [o.outputs[0].token_ids for o in base] == [
        o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": [5, 6, 7]}] * 3,
                                                       params, use_tqdm=False)]


@pytest.mark.gpu
def test_gpu_lora_free_graph_launches_no_lora_kernel(mixtral):
    """On a GPU, one replayed decode step without adapters runs no LoRA kernel; with an
    adapter it does (kernels counted with torch.profiler, graph kernels included)."""
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model_dir, adapters = mixtral
    engine = LLMEngine(EngineConfig(model_dir, device="cuda", dtype="bfloat16", enable_lora=True,
                                    max_lora_rank=8, max_loras=2, max_num_seqs=4, block_size=4,
                                    pool_memory_bytes=64 << 20, decode_graphs=True))

    def lora_kernels(lora_request) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        for i in range(3):
            engine.add_request(f"{lora_request}{i}", [5, 6, 7 + i], params, lora_request)
        for _ in range(4):  # prefill, then decode steps: their graphs are captured
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        while engine.has_unfinished_requests():
            engine.step()
        # every kernel sits in the moelora namespace: LoRA kernels are those named for it
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA
                   and "lora" in e.name.lower().replace("moelora", ""))

    assert lora_kernels(None) == 0
    assert lora_kernels(adapters[0]) > 0
    assert engine.runner.graphs.replays > 0 and engine.runner.graphs.capture_error is None
