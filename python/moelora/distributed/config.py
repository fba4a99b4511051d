"""ParallelConfig: how one engine is spread over `world_size` processes (one per GPU), and the
checks that say clearly which models and combinations it cannot serve.

Two independent choices:
* `shard_attention` (tensor parallel, Megatron-style): attention by heads (q/k/v columns, o
  rows, KV heads with them) and dense MLPs (gate/up columns, down rows) are split over all
  ranks; False replicates them (every rank computes the same attention).
* `expert_parallel`: rank r owns experts [r*E/N, (r+1)*E/N) whole; False shards every expert's
  gate/up/down like a dense MLP. A Qwen2-MoE shared expert is sharded either way.
`LLM(..., tensor_parallel_size=N)` is shard_attention; `enable_expert_parallel=True` adds
expert_parallel (vLLM's names). Replicated attention with expert parallel experts is
reachable through this class directly (MultiProcExecutor(config, ParallelConfig(...))).
Expert stacks stored quantized (MXFP4, block FP8) are split like dense ones, along their
blocks: tensor-parallel experts need a per-rank expert width that the blocks tile.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    world_size: int
    shard_attention: bool = True
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise ValueError(f"a parallel engine needs world_size >= 2, got {self.world_size}")
        if not self.shard_attention and not self.expert_parallel:
            raise ValueError("world_size > 1 with replicated attention and sharded experts "
                             "splits nothing: set shard_attention or expert_parallel")

    @classmethod
    def from_engine_config(cls, config) -> ParallelConfig:
        return cls(world_size=config.tensor_parallel_size, shard_attention=True,
                   expert_parallel=config.enable_expert_parallel)

    def describe(self) -> str:
        attention = "tensor parallel" if self.shard_attention else "replicated"
        experts = "expert parallel" if self.expert_parallel else "tensor parallel"
        return f"{self.world_size} ranks: attention {attention}, experts {experts}"

    def validate_model(self, mc) -> None:
        """Raises ValueError naming the first model dimension this split cannot divide."""
        n = self.world_size
        what = f"{mc.architecture} over {n} ranks ({self.describe()})"

        def need(value: int, name: str, hint: str = "") -> None:
            if value % n:
                raise ValueError(f"{what}: {name} = {value} is not divisible by {n}{hint}")

        if self.shard_attention:
            need(mc.num_kv_heads, "num_kv_heads",
                 " (each rank holds whole KV heads in its page pool; use a tensor_parallel_size "
                 "that divides the KV heads)")
            need(mc.num_heads, "num_heads")
            if mc.qk_norm == "full":
                raise ValueError(f"{what}: the q/k RMSNorm of {mc.family} spans all heads, so "
                                 f"attention cannot be split by heads; use "
                                 f"ParallelConfig(shard_attention=False, expert_parallel=True)")
            if not all(mc.moe_layers):
                need(mc.intermediate_size, "intermediate_size (dense MLP layers)")
        if mc.shared_expert_intermediate_size:
            need(mc.shared_expert_intermediate_size, "shared_expert_intermediate_size")
        if self.expert_parallel:
            if not mc.is_moe:
                raise ValueError(f"{what}: expert parallel needs a MoE model; {mc.family} is "
                                 f"dense (drop enable_expert_parallel)")
            need(mc.num_experts, "num_experts", " (each rank owns num_experts / N experts)")
        elif mc.is_moe:
            need(mc.moe_intermediate_size, "moe_intermediate_size",
                 " (try enable_expert_parallel=True)")
            self._check_expert_blocks(mc, what)

    def _check_expert_blocks(self, mc, what: str) -> None:
        """Tensor-parallel experts stored in blocks: each rank's cut of the expert width must
        fall on block boundaries of the stored tensors."""
        width = mc.moe_intermediate_size // self.world_size
        if mc.expert_format == "mxfp4":
            blocks, step = "MXFP4 blocks of 32 inputs", 32
        elif mc.expert_format == "fp8":
            block_n, block_k = mc.expert_fp8_block
            blocks, step = f"FP8 scale blocks of {block_n} x {block_k}", math.lcm(block_n, block_k)
        else:
            return
        if width % step:
            raise ValueError(
                f"{what}: the experts are stored in {blocks}, and each rank's share of "
                f"moe_intermediate_size ({mc.moe_intermediate_size} / {self.world_size} = "
                f"{width}) is not a multiple of {step}, so the blocks cannot be split; use "
                f"enable_expert_parallel=True (whole experts per rank; --enable-expert-parallel) "
                f"or dense expert weights (synthetic_expert_weights='dense' for synthetic "
                f"models)")


def model_config_of(model: str, **synthetic_overrides):
    """The ModelConfig a parallel engine serves for a HF directory (whose experts its loader
    dequantizes) or `synthetic:<preset>` (num_layers=, expert_weights= as for build_synthetic),
    without loading weights."""
    from moelora.models import model_class
    from moelora.models.loader import read_hf_config
    from moelora.models.synthetic import preset_model_config

    if model.startswith("synthetic:"):
        return preset_model_config(model.removeprefix("synthetic:"), **synthetic_overrides)
    if not os.path.isdir(model):
        raise ValueError(f"{model!r} is neither a model directory nor synthetic:<preset>")
    hf = read_hf_config(model)
    archs = hf.get("architectures") or []
    if not archs:
        raise ValueError(f"{model}: config.json names no architecture")
    return model_class(archs[0]).config_from_hf(hf)
