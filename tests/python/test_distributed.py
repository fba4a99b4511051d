"""Tensor- and expert-parallel serving (moelora.distributed) on the CPU: 2 processes over gloo.

The proof: greedy tokens of a parallel engine equal the single-process engine's (itself tested
against transformers + PEFT in test_engine_vs_hf.py), for mixed batches of base requests and
two PEFT adapters (attention and expert targets, different ranks), for TP=2, TP=2 + expert
parallel, and expert parallel with replicated attention; logprobs agree to float32 rounding.
A churn case (3 adapters in 2 slots of a small pool, so adapters are evicted and reloaded)
checks that the ranks' pools and adapter caches stay in step. Also: the plan shards
are exactly the slices of the full LoRA matrices, and unsupported splits fail clearly.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from hf_tiny import make_tiny
from moelora import LLM, LoRARequest, SamplingParams
from moelora.distributed import ParallelConfig, launch
from moelora.distributed.config import model_config_of
from moelora.distributed.loading import load_shard
from moelora.distributed.shard import shard_model, shard_plan, shard_sites
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine
from moelora.lora import load_adapter_plan
from moelora.models import load_model
from safetensors.torch import load_file
from test_engine_vs_hf import SECOND_CASES
from test_lora_peft import PEFT_CASES

MAX_NEW = 8
PLAN = [None, "first", "second", "first", None, "second"]
ENGINE_ARGS = {"device": "cpu", "dtype": "float32", "enable_lora": True, "max_lora_rank": 8,
               "max_loras": 2, "pool_memory_bytes": 32 << 20, "max_num_batched_tokens": 24}
TP = ParallelConfig(2)
TP_EP = ParallelConfig(2, expert_parallel=True)
EP_ONLY = ParallelConfig(2, shard_attention=False, expert_parallel=True)


class Case:
    """A tiny HF model, two PEFT adapters and the single-process engine's outputs."""

    def __init__(self, family, root, engine_args=None):
        self.engine_args = engine_args or ENGINE_ARGS
        hf_model, _ = make_tiny(family, root / "model")
        self.model = str(root / "model")
        self.requests = {}
        for index, (name, cfg) in enumerate((("first", PEFT_CASES[family]),
                                             ("second", SECOND_CASES[family]),
                                             ("third", PEFT_CASES[family]))):
            torch.manual_seed(10 + index)  # "third": same targets as "first", other weights
            peft_model = peft.get_peft_model(copy.deepcopy(hf_model),
                                             peft.LoraConfig(init_lora_weights=False, **cfg))
            peft_model.save_pretrained(root / name)
            self.requests[name] = LoRARequest(name, index + 1, str(root / name))
        gen = torch.Generator().manual_seed(1)
        self.prompts = [torch.randint(2, 300, (int(n),), generator=gen).tolist()
                        for n in (5, 9, 3, 12, 1, 7)]
        self.reference = self.generate(LLMEngine(EngineConfig(self.model, **self.engine_args)))

    def generate(self, engine, plan=PLAN, prompts=None, logprobs=1):
        """(token ids, cumulative logprob) per request, in order; stops the engine. With
        logprobs > 1 also keeps each request's per-position top logprobs in self.last_top."""
        prompts = prompts or self.prompts
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                                logprobs=logprobs)
        try:
            for index, (prompt, name) in enumerate(zip(prompts, plan)):
                engine.add_request(str(index), {"prompt_token_ids": prompt}, params,
                                   self.requests[name] if name else None)
            done = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.outputs[0]
            assert engine.memory.pool.stats()["kv_pages"] == 0
            self.last_stats = {**engine.adapters.stats(), **engine.stats}
            self.last_top = [done[str(i)].logprobs for i in range(len(prompts))]
            return [(done[str(i)].token_ids, done[str(i)].cumulative_logprob)
                    for i in range(len(prompts))]
        finally:
            engine.stop()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = Case(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


def _assert_same(ours, reference, what):
    for index, ((tokens, logprob), (ref_tokens, ref_logprob)) in enumerate(zip(ours, reference)):
        assert tokens == ref_tokens, f"{what}: request {index} ({PLAN[index]}) differs"
        assert logprob == pytest.approx(ref_logprob, abs=1e-3), f"{what}: request {index}"


@pytest.mark.parametrize("family,parallel", [
    ("mixtral", TP), ("mixtral", TP_EP), ("qwen3_moe", TP), ("qwen3_moe", TP_EP),
    ("qwen3_moe", EP_ONLY), ("gpt_oss", TP_EP), ("qwen2_moe", TP),
], ids=lambda v: v if isinstance(v, str) else v.describe().replace(" ", "_"))
def test_parallel_engine_matches_single_process(cases, family, parallel):
    case = cases(family)
    config = EngineConfig(case.model, **ENGINE_ARGS)
    engine = LLMEngine(config, parallel=launch(config, parallel))
    layer = engine.model.model.layers[0]
    if parallel.shard_attention:  # rank 0 really holds a shard: half the heads
        assert layer.self_attn.inner.q_proj.weight.shape[0] == 2 * 16
    if parallel.expert_parallel:
        assert layer.mlp.inner.experts.num_experts == model_config_of(case.model).num_experts // 2
    ours = case.generate(engine)
    _assert_same(ours, case.reference, f"{family} {parallel.describe()}")
    assert len({tuple(t) for t, _ in ours[1:4]}) > 1


def test_parallel_engine_with_decode_graphs_matches_single_process(cases):
    """decode_graphs=True in a parallel engine: pure-decode steps go through every rank's padded
    static buffers (captured as CUDA graphs on GPUs, with the collectives inside; eager here)."""
    case = cases("mixtral")
    config = EngineConfig(case.model, **ENGINE_ARGS, decode_graphs=True)
    engine = LLMEngine(config, parallel=launch(config, TP))
    ours = case.generate(engine)
    _assert_same(ours, case.reference, "mixtral TP=2 with decode graphs")
    assert engine.runner.graphs is not None and engine.runner.graphs._made  # buckets were used


def test_llm_api_and_adapter_churn(cases):
    """LLM(..., tensor_parallel_size=2, enable_expert_parallel=True), 3 adapters over 2 slots
    of a small pool: adapters are evicted and reloaded, and every rank must follow."""
    case = cases("mixtral")
    plan = ["first", "second", "third", None, "third", "first", "second", "third"]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 300, (int(n),), generator=gen).tolist()
               for n in (30, 25, 40, 17, 33, 21, 38, 29)]
    small = {**ENGINE_ARGS, "pool_memory_bytes": 48 * 2048, "max_num_seqs": 4}
    single = case.generate(LLMEngine(EngineConfig(case.model, **small)), plan, prompts)
    llm = LLM(case.model, tensor_parallel_size=2, enable_expert_parallel=True, **small)
    engine = llm.llm_engine
    ours = case.generate(engine, plan, prompts)
    assert [t for t, _ in ours] == [t for t, _ in single]
    stats = case.last_stats
    assert stats["device_evictions"] > 0, stats


# ---- pieces, without processes ------------------------------------------------------------


def _view(tensors, source):
    flat = tensors[source.tensor].reshape(-1)
    return torch.as_strided(flat, (source.rows, source.cols),
                            (source.row_stride, source.col_stride), source.offset)


@pytest.mark.parametrize("parallel", [TP, TP_EP, EP_ONLY], ids=["tp", "tp_ep", "ep_only"])
def test_plan_shards_are_slices_of_the_full_matrices(cases, parallel):
    case = cases("mixtral")
    sites = load_model(case.model, dtype=torch.float32, progress=False).lora_sites()
    full = load_adapter_plan(case.requests["first"].lora_path, sites, "mixtral")
    tensors = load_file(str(full.files[0]))
    whole = {(m.site, m.layer, m.expert, m.is_b): _view(tensors, m) for m in full.sources}
    n = parallel.world_size
    seen = set()
    for rank in range(n):
        local_sites = {s.name: s for s in shard_sites(sites, parallel)}
        for m in shard_plan(full, sites, parallel, rank).sources:
            local = _view(tensors, m)
            assert local.shape[1] == (local_sites[m.site].out_dim if m.is_b
                                      else local_sites[m.site].in_dim)
            if parallel.expert_parallel and m.site.startswith("experts."):
                expert = m.expert + rank * local_sites[m.site].num_experts
                assert torch.equal(local, whole[(m.site, m.layer, expert, m.is_b)])
                seen.add((m.site, m.layer, expert, m.is_b))
                continue
            ref = whole[(m.site, m.layer, m.expert, m.is_b)]
            if local.shape != ref.shape:
                cols = local.shape[1]
                ref = ref[:, rank * cols:(rank + 1) * cols]
            assert torch.equal(local, ref), (m.site, m.is_b, rank)
    expert_keys = {k for k in whole if k[0].startswith("experts.")}
    if parallel.expert_parallel:
        assert seen == expert_keys  # every expert matrix on exactly one rank


@pytest.mark.parametrize("family,parallel", [
    ("mixtral", TP), ("mixtral", TP_EP), ("qwen3_moe", EP_ONLY), ("gpt_oss", TP_EP),
    ("qwen2_moe", TP), ("llama", TP), ("qwen3", TP),
], ids=lambda v: v if isinstance(v, str) else v.describe().replace(" ", "_"))
def test_streamed_shard_equals_the_cut_of_the_whole_model(cases, family, parallel):
    """load_shard (one layer at a time from the checkpoint, never the whole model) gives each
    rank exactly the parameters shard_model cuts from the fully loaded model."""
    case = cases(family)
    for rank in range(parallel.world_size):
        whole = load_model(case.model, dtype=torch.float32, progress=False)
        cut, cut_sites = shard_model(whole, parallel, rank)
        streamed, sites = load_shard(case.model, parallel, rank, torch.float32, torch.device("cpu"))
        assert sites == cut_sites
        assert streamed.config == cut.config
        assert [s.name for s in streamed.lora_sites()] == [s.name for s in cut.lora_sites()]
        want = dict(cut.named_parameters())
        got = dict(streamed.named_parameters())
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert torch.equal(got[name], value), (family, rank, name)
        assert torch.equal(streamed.rotary.inv_freq, cut.rotary.inv_freq)


def test_unsupported_splits_fail_clearly(tmp_path):
    make_tiny("olmoe", tmp_path / "olmoe")
    make_tiny("llama", tmp_path / "llama")
    olmoe = model_config_of(str(tmp_path / "olmoe"))
    llama = model_config_of(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match="num_kv_heads = 2 is not divisible by 4"):
        ParallelConfig(4).validate_model(llama)
    with pytest.raises(ValueError, match="q/k RMSNorm .* spans all heads"):
        ParallelConfig(2).validate_model(olmoe)
    ParallelConfig(2, shard_attention=False, expert_parallel=True).validate_model(olmoe)
    with pytest.raises(ValueError, match="expert parallel needs a MoE model"):
        ParallelConfig(2, expert_parallel=True).validate_model(llama)
    with pytest.raises(ValueError, match="num_experts = 8 is not divisible by 3"):
        ParallelConfig(3, shard_attention=False, expert_parallel=True).validate_model(olmoe)
    with pytest.raises(ValueError, match="splits nothing"):
        ParallelConfig(2, shard_attention=False)
    with pytest.raises(ValueError, match="needs tensor_parallel_size >= 2"):
        EngineConfig("x", enable_expert_parallel=True)
    with pytest.raises(ValueError, match="num_kv_heads = 2 is not divisible by 4"):
        LLM(str(tmp_path / "llama"), device="cpu", tensor_parallel_size=4)  # before spawning
