"""Tensor- and expert-parallel serving on 2 GPUs over NCCL (marked gpu; skips without 2 GPUs).

The same proof as test_distributed.py (gloo on the CPU), with NCCL and the CUDA kernels:
- float32: greedy tokens of TP=2, TP=2 + expert parallel and expert parallel with replicated
  attention equal the single-GPU engine's (itself equal to transformers + PEFT), logprobs agree;
- bfloat16: the two engines sum partial products in different orders, so a token may differ
  only where the single-GPU engine's top-2 logprobs were within BF16_NEAR_TIE of each other;
  after such a divergence the request is not compared further;
- MXFP4 experts (synthetic tiny-gpt-oss, and gpt-oss-20b cut to 2 layers) stay MXFP4 on every
  rank and give the single GPU's tokens in float32, tensor and expert parallel.
"""

from __future__ import annotations

import pytest
import torch
from moelora.distributed import MultiProcExecutor
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine
from test_distributed import EP_ONLY, PLAN, TP, TP_EP, Case, SyntheticCase

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

GPU_ARGS = {"device": "cuda", "enable_lora": True, "max_lora_rank": 8, "max_loras": 2,
            "pool_memory_bytes": 64 << 20, "max_num_batched_tokens": 24}
BF16_NEAR_TIE = 0.25  # nats; bf16 logits of these tiny models carry ~1e-2 relative error


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    made = {}

    def get(family, dtype):
        key = (family, dtype)
        if key not in made:
            args = {**GPU_ARGS, "dtype": dtype}
            case = Case(family, tmp_path_factory.mktemp(f"{family}-{dtype}"), args)
            if dtype == "bfloat16":  # again, keeping the top-2 logprobs of every position
                case.reference = case.generate(LLMEngine(EngineConfig(case.model, **args)),
                                               logprobs=2)
                case.reference_top = case.last_top
            made[key] = case
        return made[key]

    return get


@pytest.mark.parametrize("family,parallel", [
    ("mixtral", TP), ("mixtral", TP_EP), ("qwen3_moe", EP_ONLY), ("qwen3_moe", TP_EP),
    ("gpt_oss", TP_EP), ("qwen2_moe", TP),
], ids=lambda v: v if isinstance(v, str) else v.describe().replace(" ", "_"))
def test_nccl_float32_tokens_equal_one_gpu(cases, family, parallel):
    case = cases(family, "float32")
    config = EngineConfig(case.model, **case.engine_args)
    ours = case.generate(LLMEngine(config, MultiProcExecutor(config, parallel)))
    for index, ((tokens, logprob), (ref_tokens, ref_logprob)) in enumerate(
            zip(ours, case.reference)):
        assert tokens == ref_tokens, f"{family} {parallel.describe()}: request {index} ({PLAN[index]})"
        assert logprob == pytest.approx(ref_logprob, abs=1e-3)


@pytest.mark.parametrize("family,parallel", [("mixtral", TP), ("mixtral", TP_EP),
                                             ("qwen3_moe", TP_EP)],
                         ids=lambda v: v if isinstance(v, str) else v.describe().replace(" ", "_"))
def test_nccl_bfloat16_tokens_equal_one_gpu_up_to_near_ties(cases, family, parallel):
    case = cases(family, "bfloat16")
    config = EngineConfig(case.model, **case.engine_args)
    _check_bf16(case, family, parallel, LLMEngine(config, MultiProcExecutor(config, parallel)))


@pytest.mark.parametrize("parallel", [TP, TP_EP], ids=["tp", "tp_ep"])
def test_nccl_decode_graphs_hold_the_collectives(cases, parallel):
    """decode_graphs=True in a TP engine: every rank captures its pure-decode steps, NCCL
    all-reduces (and, expert parallel, the selection of its experts' blocks) included, and
    replays them."""
    case = cases("mixtral", "bfloat16")
    config = EngineConfig(case.model, **case.engine_args, decode_graphs=True)
    engine = LLMEngine(config, MultiProcExecutor(config, parallel))
    _check_bf16(case, "mixtral", parallel, engine)
    graphs = engine.runner.graphs
    assert graphs.capture_error is None and graphs.replays > 0, graphs.capture_error


@pytest.mark.parametrize("preset,num_layers,parallel", [
    ("tiny-gpt-oss", None, TP), ("tiny-gpt-oss", None, TP_EP),
    ("gpt-oss-20b", 2, TP), ("gpt-oss-20b", 2, TP_EP),
], ids=lambda v: str(v) if not isinstance(v, type(TP)) else v.describe().replace(" ", "_"))
def test_nccl_mxfp4_gpt_oss_tokens_equal_one_gpu(tmp_path, preset, num_layers, parallel):
    args = {**GPU_ARGS, "dtype": "float32", "pool_memory_bytes": 512 << 20,
            "synthetic_num_layers": num_layers}
    case = SyntheticCase(preset, "mxfp4", tmp_path, args)
    config = EngineConfig(case.model, **case.engine_args)
    engine = LLMEngine(config, MultiProcExecutor(config, parallel))
    assert engine.model.model.layers[0].mlp.inner.experts.format == "mxfp4"
    ours = case.generate(engine)
    for index, ((tokens, _), (ref_tokens, _)) in enumerate(zip(ours, case.reference)):
        assert tokens == ref_tokens, f"{preset} {parallel.describe()}: request {index}"


def _check_bf16(case, family, parallel, engine):
    ours = case.generate(engine, logprobs=2)
    compared = identical = 0
    for index, ((tokens, _), (ref_tokens, _)) in enumerate(zip(ours, case.reference)):
        for pos, (got, want) in enumerate(zip(tokens, ref_tokens)):
            compared += 1
            if got == want:
                identical += 1
                continue
            top = sorted((lp.logprob for lp in case.reference_top[index][pos].values()),
                         reverse=True)
            gap = top[0] - top[1]
            assert gap < BF16_NEAR_TIE, (f"{family} {parallel.describe()}: request {index} "
                                         f"position {pos}: {got} != {want}, top-2 gap {gap:.3f}")
            break
    print(f"{family} {parallel.describe()} bf16: {identical}/{compared} compared tokens equal")
    assert identical >= compared // 2
