"""Tensor- and expert-parallel serving (moelora.distributed) on the CPU: 2 processes over gloo.

The proof: greedy tokens of a parallel engine (LLMEngine handed a MultiProcExecutor) equal the
single-process engine's (itself tested against transformers + PEFT in test_engine_vs_hf.py),
for mixed batches of base requests and two PEFT adapters (attention and expert targets,
different ranks), for TP=2, TP=2 + expert parallel, and expert parallel with replicated
attention; logprobs agree to float32 rounding. Quantized expert stacks (a tiny MXFP4 GPT-OSS,
FP8 experts) are served the same way, and their shards are exactly the slices of the
dequantized whole. A churn case (3 adapters in 2 slots of a small pool, so adapters are evicted
and reloaded) checks that the ranks' pools and adapter caches stay in step. Also: the plan
shards are exactly the slices of the full LoRA matrices, and unsupported splits fail clearly.
"""

from __future__ import annotations

import copy
import dataclasses

import peft
import pytest
import torch
from hf_tiny import make_tiny
from moelora import LLM, LoRARequest, SamplingParams
from moelora.bench.synthetic_adapters import write_random_adapter
from moelora.distributed import MultiProcExecutor, ParallelConfig
from moelora.distributed.config import model_config_of
from moelora.distributed.loading import load_shard
from moelora.distributed.shard import PartitionedExperts, shard_model, shard_plan, shard_sites
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine
from moelora.lora import load_adapter_plan, per_expert_sources
from moelora.models import load_model, model_class
from moelora.models.quantized import dequantize_fp8_blocks, dequantize_mxfp4
from moelora.models.synthetic import init_random_, preset_model_config
from moelora.ops import moe as moe_ops
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


class SyntheticCase(Case):
    """synthetic:<preset> with its experts stored as `expert_weights`, two random adapters on
    its attention and expert sites, and the single-process engine's outputs."""

    def __init__(self, preset, expert_weights, root, engine_args=None):
        self.engine_args = {**(engine_args or ENGINE_ARGS),
                            "synthetic_expert_weights": expert_weights}
        self.model = f"synthetic:{preset}"
        single = LLMEngine(EngineConfig(self.model, **self.engine_args))
        sites = single.executor.full_sites
        self.requests = {
            name: LoRARequest(name, index + 1, write_random_adapter(
                str(root / name), sites, 8, seed=20 + index, std=0.1, dtype=torch.float32))
            for index, name in enumerate(("first", "second"))}
        gen = torch.Generator().manual_seed(2)
        self.prompts = [torch.randint(2, 300, (int(n),), generator=gen).tolist()
                        for n in (5, 9, 3, 12, 1, 7)]
        self.reference = self.generate(single)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    made = {}

    def get(family, expert_weights=None):
        key = (family, expert_weights)
        if key not in made:
            root = tmp_path_factory.mktemp(family)
            made[key] = (Case(family, root) if expert_weights is None
                         else SyntheticCase(family, expert_weights, root))
        return made[key]

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
    engine = LLMEngine(config, MultiProcExecutor(config, parallel))
    layer = engine.model.model.layers[0]
    if parallel.shard_attention:  # rank 0 really holds a shard: half the heads
        assert layer.self_attn.inner.q_proj.weight.shape[0] == 2 * 16
    if parallel.expert_parallel:
        assert layer.mlp.inner.experts.num_experts == model_config_of(case.model).num_experts // 2
    ours = case.generate(engine)
    _assert_same(ours, case.reference, f"{family} {parallel.describe()}")
    assert len({tuple(t) for t, _ in ours[1:4]}) > 1


@pytest.mark.parametrize("preset,weights,parallel", [
    ("tiny-gpt-oss", "mxfp4", TP), ("tiny-gpt-oss", "mxfp4", TP_EP), ("tiny-moe", "fp8", TP_EP),
], ids=lambda v: v if isinstance(v, str) else v.describe().replace(" ", "_"))
def test_quantized_experts_over_ranks_match_single_process(cases, preset, weights, parallel):
    """MXFP4 and FP8 expert stacks stay as stored on every rank: cut along the expert width
    (tensor parallel, whole MXFP4 blocks) or along the experts (expert parallel)."""
    case = cases(preset, weights)
    config = EngineConfig(case.model, **case.engine_args)
    engine = LLMEngine(config, MultiProcExecutor(config, parallel))
    experts = engine.model.model.layers[0].mlp.inner.experts
    assert experts.format == weights
    whole = preset_model_config(preset, expert_weights=weights)
    if parallel.expert_parallel:
        assert experts.num_experts == whole.num_experts // 2
    else:
        assert experts.inter == whole.moe_intermediate_size // 2
    ours = case.generate(engine)
    _assert_same(ours, case.reference, f"{preset} {weights} {parallel.describe()}")
    assert len({tuple(t) for t, _ in ours[1:4]}) > 1


def test_expert_parallel_without_adapters_matches_single_process():
    """No adapter anywhere: the experts' activation runs fused into the w13 GEMM of each
    rank's blocks (LLM(..., tensor_parallel_size=2, enable_expert_parallel=True))."""
    args = {"device": "cpu", "dtype": "float32", "pool_memory_bytes": 16 << 20}
    prompts = [{"prompt_token_ids": p} for p in ([5, 9, 33, 2], [7], list(range(40, 57)))]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    outputs = []
    for parallel in ({}, {"tensor_parallel_size": 2, "enable_expert_parallel": True}):
        with LLM("synthetic:tiny-gpt-oss", **args, **parallel) as llm:
            outputs.append([o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)])
    for single, ours in zip(*outputs):
        assert ours.token_ids == single.token_ids
        assert ours.cumulative_logprob == pytest.approx(single.cumulative_logprob, abs=1e-3)


def test_parallel_engine_with_decode_graphs_matches_single_process(cases):
    """decode_graphs=True in a parallel engine: pure-decode steps go through every rank's padded
    static buffers (captured as CUDA graphs on GPUs, with the collectives inside; eager here)."""
    case = cases("mixtral")
    config = EngineConfig(case.model, **ENGINE_ARGS, decode_graphs=True)
    engine = LLMEngine(config, MultiProcExecutor(config, TP))
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
    assert isinstance(engine.executor, MultiProcExecutor)
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
    whole = {(m.site, m.layer, m.expert, m.is_b): _view(tensors, m)
             for m in per_expert_sources(full.sources)}
    n = parallel.world_size
    seen = set()
    for rank in range(n):
        local_sites = {s.name: s for s in shard_sites(sites, parallel)}
        for m in per_expert_sources(shard_plan(full, sites, parallel, rank).sources):
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


def _quantized_model(preset, weights, fp8_block=None):
    """A one-layer synthetic model, its experts stored as `weights` (FP8 blocks `fp8_block`),
    packed for the kernels as a loaded one is (MXFP4: the mma layout)."""
    config = preset_model_config(preset, num_layers=1, expert_weights=weights)
    if fp8_block is not None:
        config = dataclasses.replace(config, expert_fp8_block=fp8_block)
    model = model_class(config.architecture)(config)
    init_random_(model, seed=3)
    return model.pack_for_kernels().eval()


def _dense_stack(stack: moe_ops.ExpertWeights) -> torch.Tensor:
    """An expert stack as stored, dequantized to float32 [E, out, in] (the reference)."""
    if stack.format == "mxfp4":
        blocks, scales = stack.weight, stack.scales
        if stack.layout == "mma_tiled":
            blocks, scales = moe_ops.mxfp4_from_tiled_layout(blocks, scales, stack.k)
        if stack.layout != "checkpoint":
            blocks = moe_ops.mxfp4_from_mma_layout(blocks)
        return dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2)
    if stack.format == "fp8":
        return torch.stack([dequantize_fp8_blocks(w, s, torch.float32)
                            for w, s in zip(stack.weight, stack.scales)])
    return stack.weight.float()


@pytest.mark.parametrize("preset,weights,fp8_block,parallel", [
    ("tiny-gpt-oss", "mxfp4", None, TP), ("tiny-gpt-oss", "mxfp4", None, EP_ONLY),
    ("tiny-moe", "fp8", (32, 16), TP), ("tiny-moe", "fp8", None, TP_EP),
], ids=["mxfp4-tp", "mxfp4-ep", "fp8-tp", "fp8-ep"])
def test_quantized_expert_shards_are_slices_of_the_whole(preset, weights, fp8_block, parallel):
    whole = _quantized_model(preset, weights, fp8_block)
    experts = whole.model.layers[0].mlp.experts
    w13, w2 = (_dense_stack(s) for s in experts.stacks())
    b13, b2 = experts.b13, experts.b2
    n, inter, per_rank = 2, experts.inter // 2, experts.num_experts // 2
    for rank in range(n):
        cut, _ = shard_model(copy.deepcopy(whole), parallel, rank)
        local = cut.model.layers[0].mlp.inner.experts
        assert local.format == weights
        got13, got2 = (_dense_stack(s) for s in local.stacks())
        if parallel.expert_parallel:
            own = slice(rank * per_rank, (rank + 1) * per_rank)
            assert torch.equal(got13, w13[own]) and torch.equal(got2, w2[own])
            if b13 is not None:
                assert torch.equal(local.b13, b13[own]) and torch.equal(local.b2, b2[own])
            continue
        gate = slice(rank * inter, (rank + 1) * inter)
        up = slice(experts.inter + rank * inter, experts.inter + (rank + 1) * inter)
        assert torch.equal(got13, torch.cat([w13[:, gate], w13[:, up]], dim=1))
        assert torch.equal(got2, w2[:, :, gate])
        if b13 is not None:  # row-parallel bias: added once, by rank 0
            assert torch.equal(local.b13, torch.cat([b13[:, gate], b13[:, up]], dim=1))
            assert torch.equal(local.b2, b2 if rank == 0 else torch.zeros_like(b2))


def test_local_routing_keeps_exactly_the_ranks_pairs():
    """PartitionedExperts runs the MoE kernels over its experts' blocks of the routing only."""
    whole = _quantized_model("tiny-moe", "mxfp4")
    logits = torch.randn(13, whole.config.num_experts, generator=torch.Generator().manual_seed(4))
    routing = moe_ops.route(logits, whole.config.top_k, block_m=4)
    ids = routing.topk_ids.flatten().tolist()
    for rank in range(2):
        cut, _ = shard_model(copy.deepcopy(whole), EP_ONLY, rank)
        experts = cut.model.layers[0].mlp.inner.experts
        assert isinstance(experts, PartitionedExperts)
        local = experts.local_routing(routing)
        blocks = int(local.num_blocks)
        got = set()
        for b in range(blocks):
            expert = int(local.block_expert[b])
            assert 0 <= expert < experts.num_experts
            rows = local.sorted_pairs[b * local.block_m:(b + 1) * local.block_m].tolist()
            got.update((pair, expert) for pair in rows if pair >= 0)
        first = experts.expert_offset
        want = {(p, e - first) for p, e in enumerate(ids) if first <= e < first + 4}
        assert got == want and want
        assert (local.block_expert[blocks:] == -1).all()


def test_quantized_splits_that_cut_a_block_fail_clearly():
    with pytest.raises(ValueError, match=r"FP8 scale blocks of 128 x 128.*128 / 2 = 64.*"
                                         r"enable_expert_parallel=True"):
        LLM("synthetic:tiny-moe", device="cpu", tensor_parallel_size=2,
            synthetic_expert_weights="fp8")  # refused before any process starts
    gpt_oss = model_config_of("synthetic:tiny-gpt-oss")
    assert gpt_oss.expert_format == "mxfp4"
    ParallelConfig(2).validate_model(gpt_oss)  # 64 / 2: one block of 32 inputs each
    wide = dataclasses.replace(gpt_oss, moe_intermediate_size=96)
    with pytest.raises(ValueError, match=r"MXFP4 blocks of 32 inputs.*96 / 2 = 48.*"
                                         r"synthetic_expert_weights='dense'"):
        ParallelConfig(2).validate_model(wide)
    ParallelConfig(2, expert_parallel=True).validate_model(wide)  # whole experts: any width
    assert model_config_of("synthetic:tiny-gpt-oss", expert_weights="dense").expert_format \
        == "dense"


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
