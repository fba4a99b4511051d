"""Steps through the padded static buffers of moelora.engine.step_graphs.

On the CPU the padded path runs eagerly (no CUDA graph), which is what these tests check: a
step padded to its bucket (dummy rows: no KV write, no LoRA, one key of page 0) gives the same
greedy tokens as the unpadded engine, with mixed adapters, several bucket sizes, block tables
wider than some steps need, and steps that mix prompts with decoding sequences (their prompt
tokens take the paged kernel there, SDPA in the eager engine). The GPU variant (marked gpu)
captures and replays graphs.
"""

from __future__ import annotations

import argparse
import copy

import peft
import pytest
import torch
from hf_tiny import make_tiny
from moelora import LLM, LoRARequest, SamplingParams
from moelora.engine.step_graphs import default_buckets
from moelora.entrypoints.llm import _decode_graphs
from moelora.graph_flags import add_graph_arguments, graph_options, graphs_choice
from test_lora_peft import PEFT_CASES


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert default_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    # beyond the decode sizes, multiples of 32 up to the capture size (which is one itself)
    assert default_buckets(20, 100) == [1, 2, 4, 8, 16, 20, 32, 64, 96, 100]
    assert default_buckets(64, 256) == [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    assert default_buckets(64, 40) == [1, 2, 4, 8, 16, 32, 40]  # a cap below max_num_seqs


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
    assert graph_options(parser.parse_args(["--max-cudagraph-capture-size", "128"])) == {
        "decode_graphs": None, "max_cudagraph_capture_size": 128}
    assert graph_options(parser.parse_args([]))["max_cudagraph_capture_size"] is None


def test_cpu_engine_runs_eagerly_by_default(mixtral):
    llm = LLM(model=mixtral[0], device="cpu", dtype="float32", pool_memory_bytes=16 << 20)
    assert llm.llm_engine.runner.graphs is None


def _generate(model_dir, adapters, device, dtype, **engine_args):
    llm = LLM(model=model_dir, device=device, dtype=dtype, enable_lora=True, max_lora_rank=8,
              max_loras=2, max_num_seqs=7, block_size=4, pool_memory_bytes=16 << 20,
              **engine_args)
    # resident first: a cold adapter's requests join the batch on the step its load finishes,
    # so two engines could batch them differently, and in bf16 a row's result can depend on its
    # step's size (the kernels' plans follow it)
    llm.llm_engine.adapters.preload_all(adapters)
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
    from moelora.engine import step_graphs

    model_dir, adapters = mixtral
    graphed, engine = _generate(model_dir, adapters, "cuda", "bfloat16", decode_graphs=True)
    assert engine.runner.graphs.capture_error is None
    assert engine.runner.graphs.replays > 0
    original = step_graphs.StepGraphs.__init__

    def no_capture(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.capture = False

    monkeypatch.setattr(step_graphs.StepGraphs, "__init__", no_capture)
    padded_eager, engine = _generate(model_dir, adapters, "cuda", "bfloat16", decode_graphs=True)
    assert engine.runner.graphs.replays == 0
    assert graphed == padded_eager


@pytest.mark.gpu
def test_gpu_captured_lora_deltas_run_on_their_own_stream(mixtral, monkeypatch):
    """While a decode graph is captured, each LoRA delta is computed on the LoRA stream (beside
    its base GEMM in the graph) and joined before it is added; eager passes compute it in line.
    The replays give the tokens of the padded eager passes (test above)."""
    from moelora.engine import paged_context

    captured = {"forks": 0}
    original = paged_context.lora_stream

    def counted(device):
        assert torch.cuda.is_current_stream_capturing()
        captured["forks"] += 1
        return original(device)

    monkeypatch.setattr(paged_context, "lora_stream", counted)
    model_dir, adapters = mixtral
    graphed, engine = _generate(model_dir, adapters, "cuda", "bfloat16", decode_graphs=True)
    assert engine.runner.graphs.capture_error is None and engine.runner.graphs.replays > 0
    assert captured["forks"] > 0
    assert all(len(tokens) > 0 for tokens in graphed)


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
    """A LoRA engine's steps where no token has an adapter: no LoRA op runs, and the steps
    (the prompts' step in bucket 32, the decode steps in bucket 4) take their bucket's LoRA-free
    graph; steps with adapters take the other one."""
    model_dir, adapters = mixtral
    llm = LLM(model=model_dir, device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8,
              max_loras=2, max_num_seqs=4, block_size=4, pool_memory_bytes=16 << 20,
              decode_graphs=True)
    calls = _count_lora_launches(monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    base = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, params, use_tqdm=False)
    graphs = llm.llm_engine.runner.graphs
    assert calls["lora"] == 0 and set(graphs._made) == {(32, False), (4, False)}
    # resident first, so that the three requests decode together (one bucket) however long the
    # load takes
    llm.llm_engine.adapters.preload(adapters[0])
    llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, params, lora_request=adapters[0],
                 use_tqdm=False)
    assert calls["lora"] > 0 and set(graphs._made) == {(32, False), (4, False), (32, True),
                                                    (4, True)}
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
        for _ in range(4):  # prefill, then decode steps
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


@pytest.mark.gpu
def test_gpu_engine_captures_every_bucket_when_it_starts(mixtral):
    """A GPU engine has every bucket's two graphs when it starts, and its steps, with and
    without an adapter, replay those graphs: none is captured while requests run."""
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    model_dir, adapters = mixtral
    engine = LLMEngine(EngineConfig(model_dir, device="cuda", dtype="bfloat16", enable_lora=True,
                                    max_lora_rank=8, max_loras=2, max_num_seqs=4, block_size=4,
                                    max_cudagraph_capture_size=64,
                                    pool_memory_bytes=64 << 20, decode_graphs=True))
    graphs = engine.runner.graphs
    assert graphs.capture_error is None and graphs.buckets == [1, 2, 4, 32, 64]
    made = dict(graphs._made)
    assert set(made) == {(b, lora) for b in graphs.buckets for lora in (False, True)}
    assert all(g.graph is not None for g in made.values())
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i in range(3):
        engine.add_request(str(i), [5, 6, 7 + i], params, adapters[0] if i else None)
    while engine.has_unfinished_requests():
        engine.step()
    assert graphs.replays > 0
    assert all(graphs._made[key] is made[key] for key in made)  # the same graphs, none new


def _staggered_run(model_dir, adapter, **engine_args) -> tuple[dict, object]:
    """Requests arriving while others decode, prompts chunked beside decodes (16 tokens a step),
    one prompt sharing a cached prefix, prompt logprobs: greedy tokens and logprobs by id."""
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model_dir, device="cpu", dtype="float32", enable_lora=True,
                                    max_lora_rank=8, max_loras=2, max_num_seqs=6, block_size=4,
                                    max_num_batched_tokens=16, enable_prefix_caching=True,
                                    pool_memory_bytes=16 << 20, **engine_args))
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 60, (int(n),), generator=gen).tolist() for n in (5, 23, 9, 3)]
    prompts.append(prompts[1][:12] + [7, 8, 9])  # shares three cached blocks of prompt 1
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    results: dict = {}
    engine.mixed_padded_steps = 0  # steps with prompt tokens that ran padded to a bucket
    forward = engine.runner.forward

    def counted(step, *args):
        engine.mixed_padded_steps += step.bucket is not None and step.num_tokens > step.num_seqs
        return forward(step, *args)

    engine.runner.forward = counted
    for step in range(200):
        if step < len(prompts):  # one arrival per step while the others run
            engine.add_request(str(step), prompts[step], params, adapter if step % 2 else None)
        for out in engine.step():
            if out.finished:
                completion = out.outputs[0]
                results[out.request_id] = (
                    list(completion.token_ids),
                    [sorted(d) for d in completion.logprobs],
                    [None if d is None else sorted(d) for d in out.prompt_logprobs])
        if step >= len(prompts) and not engine.has_unfinished_requests():
            break
    return results, engine


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs_gpt_oss")
    hf_model, _ = make_tiny("gpt_oss", root / "model")
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
        init_lora_weights=False, **PEFT_CASES["gpt_oss"]))
    peft_model.save_pretrained(root / "a")
    return str(root / "model"), LoRARequest("a", 1, str(root / "a"))


def test_steps_mixing_prompts_and_decodes_match_the_eager_engine(gpt_oss):
    """gpt-oss (sliding window, sinks): steps holding prompt chunks beside decoding sequences
    run padded to their bucket and give the eager engine's tokens and logprob ids."""
    model_dir, adapter = gpt_oss
    eager, _ = _staggered_run(model_dir, adapter)
    padded, engine = _staggered_run(model_dir, adapter, decode_graphs=True,
                                    max_cudagraph_capture_size=16)
    assert padded == eager and len(padded) == 5
    assert engine.mixed_padded_steps >= 5


def test_capture_size_is_checked_and_defaults_to_the_batch_limits():
    from moelora.engine.config import EngineConfig

    assert EngineConfig("m", max_num_seqs=64).max_cudagraph_capture_size == 256
    assert EngineConfig("m", max_num_seqs=512).max_cudagraph_capture_size == 512
    assert EngineConfig("m", max_num_batched_tokens=128).max_cudagraph_capture_size == 128
    with pytest.raises(ValueError, match="max_cudagraph_capture_size"):
        EngineConfig("m", max_cudagraph_capture_size=0)
