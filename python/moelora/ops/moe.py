"""The fused MoE layer's ops (include/moelora/moe.h): routing, expert GEMMs over weights kept as
stored (dense, MXFP4, block FP8), the gated activation and the sum over top-k.

One layer: ``router_logits``, ``route`` (router logits -> top-k, weights, expert blocks),
``expert_gemm`` for w13 (activation fused, or h13 then ``activation`` when a LoRA delta goes in
between), ``expert_gemm`` for w2 with the routing weights, ``moe_sum``. Outputs are allocated
here; every check is the library's (``moelora.InvalidArgument`` naming the argument). Import as
``from moelora.ops import moe as moe_ops``.

Which expert GEMM runs is decided once per step by ``plan_expert_gemm`` from GEMM_PLAN (weight
format and rows per touched expert -> kernel and rows per block); ``route(..., plan=)`` carries
the plan to every ``expert_gemm`` of the step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelora import _C
from moelora._tensor import as_optional_ref, as_ref, stream_handle

ROUTINGS = {"softmax_topk": 0, "topk_softmax": 1}
ACTIVATIONS = {"none": 0, "silu": 1, "gpt_oss": 2}
FORMATS = {"dense": 0, "mxfp4": 1, "fp8": 2}
# How MXFP4 blocks hold their codes (moelora/moe.h MoeMxfp4Layout): "checkpoint" as GPT-OSS
# stores them, "mma" each 32-bit word bit-permuted for the tensor-core kernels
# (mxfp4_to_mma_layout; src/mxfp4_layout.h), "mma_tiled" those words in 16-row tiles stored
# k-step-major, so that a warp of the tiled kernel reads contiguous memory
# (mxfp4_to_tiled_layout).
MXFP4_LAYOUTS = {"checkpoint": 0, "mma": 1, "mma_tiled": 2}
MXFP4_TILE_ROWS = _C.MXFP4_TILE_ROWS
MXFP4_STEP_BLOCKS = _C.MXFP4_STEP_BLOCKS  # blocks of 32 codes (16 bytes) a row per k-step
# The native kernels (moelora/moe.h MoeGemmKernel): "tensor_core" the tiled kernel, "stream" the
# persistent decode kernel (block_m 8 or 16), "simple" one warp per output element.
KERNELS = {"auto": 0, "simple": 1, "tensor_core": 2, "stream": 3}
# Forms in Python over torch: torch._grouped_mm on expert-sorted rows (quantized stacks
# dequantized first, moe_dequantize, in chunks of at most GROUPED_SCRATCH_BYTES).
GROUPED = "grouped_mm"
GEMM_KERNELS = (*KERNELS, GROUPED)
# Rows per block the tensor-core kernels are built for; other sizes run the simple kernel.
TENSOR_CORE_BLOCK_M = (8, 16, 32, 64)
STREAM_BLOCK_M = (8, 16)
SPLIT_BLOCK_M = (8, 16, 32)  # the tiled kernel's decode shapes, the ones that split K
MAX_EXPERTS = _C.MOE_MAX_EXPERTS
MAX_STREAM_CONSUMERS = _C.MOE_MAX_STREAM_CONSUMERS
MAX_GEMM_SPLITS = _C.MOE_MAX_GEMM_SPLITS
SPLIT_BY_SHAPE = 0  # GemmPlan.splits: each GEMM of the step takes split_k_ways of its own grid
GROUPED_SCRATCH_BYTES = 256 << 20
GROUPED_EPILOGUE_ROWS = 4096  # rows of the grouped form's float32 epilogue at a time

# The expert GEMM of a step, by weight format: (mean rows per touched expert up to, kernel,
# block_m), the first row that holds the step's num_pairs / min(experts, num_pairs) is taken.
# Measured on an H100 80GB over gpt-oss-20b and qwen3-30b-a3b layers at T = 1..2048
# (bench/studies/moe_decode_ab.py; docs/performance.md): the tiled tensor-core kernel with
# 8-row blocks leads at decode for every format (gpt-oss-20b MXFP4, T = 1: 88 us a layer; the
# persistent stream kernel 125-229 us); dense bfloat16 moves to torch's grouped GEMM once
# experts hold more than one row (gpt-oss-20b T = 16: 633 against 727 us); quantized stacks
# stay in the tiled kernel, which dequantizes each weight in registers, with 32-row blocks once
# experts hold several rows (gpt-oss-20b MXFP4 T = 512: 1036 us; grouped over a dequantized
# copy 2919 us). Every tensor_core row splits K where its grid is too small for the GPU
# (split_k_ways below). Edit the thresholds here and nowhere else.
GEMM_PLAN = {
    "dense": ((1, "tensor_core", 8), (math.inf, GROUPED, 64)),
    "mxfp4": ((2, "tensor_core", 8), (4, "tensor_core", 16), (math.inf, "tensor_core", 32)),
    "fp8": ((2, "tensor_core", 8), (4, "tensor_core", 16), (math.inf, "tensor_core", 32)),
}

# Split-K of the tiled kernel (moelora/moe.h MoeGemmOptions.splits), decided per GEMM from its
# grid: one CTA per (row tile, block) is too few CTAs at decode, and each warp's load ->
# dequantize -> mma chain then sets the pace rather than HBM; splitting K over grid z puts more
# independent warps on the same weight bytes, and a finishing kernel adds the float32 partial
# sums (L2-resident) and applies the epilogue. Fitted on one H100 over forced 1, 2, 4 and 8 ways
# per GEMM at 1-3 tokens (bench/results/h100-split-rule.jsonl; docs/performance.md, "Split-K
# at decode"):
# - quantized stacks (MXFP4, FP8: 12-32 k-steps of 64 bytes a row at these shapes) gain only
#   below SPLIT_BELOW_WAVES of a wave of resident CTAs (gpt-oss-20b MXFP4 w2 at one token, 180
#   CTAs: 25.4 us whole, 20.6 in 8 ways; its w13, 360 CTAs: 29.7 whole, 32.1 in 4), into
#   enough ways for SPLIT_TARGET_WAVES waves, at least SPLIT_MIN_K_STEPS k-steps a split; rows
#   of fewer than SPLIT_MIN_ROW_STEPS k-steps stay whole (qwen3-30b-a3b FP8 w2, 12 k-steps:
#   17.0 us whole, 17.6-20.0 split);
# - dense stacks (bf16: 64-90 k-steps a row) gain from SPLIT_DENSE_WAYS ways up to
#   SPLIT_BELOW_WAVES_DENSE waves (gpt-oss-20b bf16 at three tokens, w13 ~950 CTAs: 249 us
#   whole, 207 in 8 ways; qwen3-30b-a3b bf16 at eight tokens, w2 ~1630 CTAs: 88.8 whole, 72.6).
#   Past 2.5 waves nothing was measured in the engine's steps; gpt-oss-20b bf16 w13 at eight
#   tokens (~1970 CTAs) still gained in the layer sweep (334 -> 306 us).
TILED_CTAS_PER_SM = 5  # resident CTAs of the decode shapes: 95 registers x 128 threads
SPLIT_BELOW_WAVES = 0.4
SPLIT_TARGET_WAVES = 2
SPLIT_MIN_K_STEPS = 2
SPLIT_MIN_ROW_STEPS = 16
SPLIT_BELOW_WAVES_DENSE = 2.5
SPLIT_DENSE_WAYS = 8


def split_k_ways(ctas: float, k_steps: int, sm_count: int, dense: bool = False) -> int:
    """Split-K ways for a tiled-kernel grid of `ctas` CTAs (row tiles x expected blocks) whose
    weight rows hold `k_steps` k-steps, on a GPU of `sm_count` SMs; `dense`: bf16 / fp16
    weights, else quantized."""
    wave = sm_count * TILED_CTAS_PER_SM
    below = SPLIT_BELOW_WAVES_DENSE if dense else SPLIT_BELOW_WAVES
    if ctas <= 0 or ctas >= below * wave or k_steps < SPLIT_MIN_ROW_STEPS:
        return 1
    wanted = SPLIT_DENSE_WAYS if dense else math.ceil(SPLIT_TARGET_WAVES * wave / ctas)
    return max(1, min(wanted, k_steps // SPLIT_MIN_K_STEPS, MAX_GEMM_SPLITS))


def tiled_grid(weights: ExpertWeights, gated: bool, block_m: int, num_pairs: int,
               top_k: int) -> tuple[float, int]:
    """(expected CTAs of one split, k-steps per weight row) of the tiled kernel for one GEMM:
    row tiles as moe/gemm.cuh lays them out (64 weight rows, or 32 gate + 32 up rows, per CTA
    at block_m 8..32) times the blocks a step of num_pairs pairs is expected to fill (experts
    touched by num_pairs / top_k tokens choosing top_k of E uniformly, or full blocks of pairs
    where there are more)."""
    rows = weights.out_dim // 2 if gated else weights.out_dim
    tiles = math.ceil(rows / (32 if gated else 64))
    experts = weights.num_experts
    tokens = num_pairs / max(1, top_k)
    touched = experts * (1 - (1 - min(top_k, experts) / experts) ** tokens) if num_pairs else 0
    blocks = max(touched, num_pairs / block_m)
    row_bytes = {"mxfp4": weights.in_dim // 2, "fp8": weights.in_dim}.get(
        weights.format, weights.in_dim * weights.weight.element_size())
    return tiles * blocks, math.ceil(row_bytes / 64)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _code(table: dict, name: str, what: str) -> int:
    if name not in table:
        raise ValueError(f"{what} must be one of {sorted(table)}, got {name!r}")
    return table[name]


@dataclass(frozen=True)
class GemmPlan:
    """The expert GEMM form of one step: a kernel of GEMM_KERNELS, the rows per block, for the
    stream kernel its consumer warps (0: the library's choice per weight format), and for the
    tiled kernel its split-K ways (SPLIT_BY_SHAPE: split_k_ways of each GEMM's own grid)."""

    kernel: str
    block_m: int
    stream_consumers: int = 0
    splits: int = 1

    def __post_init__(self):
        if self.kernel not in GEMM_KERNELS:
            raise ValueError(f"kernel must be one of {GEMM_KERNELS}, got {self.kernel!r}")
        if self.block_m < 1:
            raise ValueError(f"block_m must be positive, got {self.block_m}")
        if not 0 <= self.stream_consumers <= MAX_STREAM_CONSUMERS:
            raise ValueError(f"stream_consumers must be in [0, {MAX_STREAM_CONSUMERS}], got "
                             f"{self.stream_consumers}")
        if not 0 <= self.splits <= MAX_GEMM_SPLITS:
            raise ValueError(f"splits must be in [0, {MAX_GEMM_SPLITS}] (0: by shape), got "
                             f"{self.splits}")
        if self.splits != 1 and self.kernel != "tensor_core":
            raise ValueError(f"split-K is the tensor_core kernel's; {self.kernel} takes "
                             f"splits = 1, got {self.splits}")
        if self.splits > 1 and self.block_m not in SPLIT_BLOCK_M:
            raise ValueError(f"split-K runs with block_m in {SPLIT_BLOCK_M}, got "
                             f"{self.block_m}")

    @classmethod
    def parse(cls, text: str) -> GemmPlan:
        """"kernel[:block_m[:consumers]][:s[ways]]", e.g. "stream:16:12", "grouped_mm" (block_m
        64), "tensor_core:8:s3" (three k splits) or "tensor_core:8:s" (split_k_ways)."""
        parts = text.split(":")
        splits = 1
        if len(parts) > 2 and parts[-1].startswith("s"):
            ways = parts.pop()[1:]
            splits = int(ways) if ways else SPLIT_BY_SHAPE
        if not 1 <= len(parts) <= 3:
            raise ValueError(f"a plan is kernel[:block_m[:consumers]][:s[ways]], got {text!r}")
        numbers = [int(p) for p in parts[1:]]
        numbers = numbers or [64]
        return cls(parts[0], numbers[0], *numbers[1:], splits=splits)

    def __str__(self) -> str:
        tail = f":{self.stream_consumers}" if self.stream_consumers else ""
        if self.splits != 1:
            tail += f":s{self.splits}" if self.splits else ":s"
        return f"{self.kernel}:{self.block_m}{tail}"


def plan_expert_gemm(num_pairs: int, num_experts: int, weight_format: str,
                     table: dict | None = None) -> GemmPlan:
    """The GEMM_PLAN row (or `table`'s) for a step of `num_pairs` (token, expert) pairs."""
    rows = (table or GEMM_PLAN).get(weight_format)
    if rows is None:
        raise ValueError(f"weight format must be one of {sorted(GEMM_PLAN)}, "
                         f"got {weight_format!r}")
    per_expert = num_pairs / max(1, min(num_experts, num_pairs))
    for most, kernel, block_m in rows:
        if per_expert <= most:
            splits = SPLIT_BY_SHAPE if kernel == "tensor_core" else 1
            return GemmPlan(kernel, block_m, splits=splits)
    raise ValueError(f"GEMM_PLAN[{weight_format!r}] has no row for {per_expert:g} rows per "
                     "expert: its last row must hold math.inf")


@dataclass
class Routing:
    """What ``route`` returns: the top-k choice per token and the pairs grouped by expert."""

    topk_ids: torch.Tensor  # int32 [T, K], best first
    topk_weights: torch.Tensor  # float32 [T, K]
    sorted_pairs: torch.Tensor  # int32 [max_blocks * block_m], pad -1
    block_expert: torch.Tensor  # int32 [max_blocks], -1 past num_blocks
    num_blocks: torch.Tensor  # int32 [1]
    expert_counts: torch.Tensor  # int32 [E]
    block_m: int
    plan: GemmPlan | None = None  # the step's expert GEMM form when route() was given one

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def num_pairs(self) -> int:
        return self.topk_ids.numel()


@dataclass
class ExpertWeights:
    """One expert stack as stored (moelora/moe.h MoeExpertWeights): dense [E, N, K]; MXFP4
    blocks uint8 [E, N, K/32, 16] + scales uint8 [E, N, K/32], their words in `layout`
    (MXFP4_LAYOUTS), or in the "mma_tiled" layout [E, N/16, S, 16, 64] + [E, N/16, S, 16, 4]
    (S = ceil(K/128); `k` then gives K, which the padded k-steps do not); FP8 float8_e4m3fn (or
    its uint8 bytes) [E, N, K] + float32 scales [E, ceil(N/block_n), ceil(K/block_k)]."""

    format: str
    weight: torch.Tensor
    scales: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # [E, N]
    block_n: int = 0
    block_k: int = 0
    layout: str = "checkpoint"
    k: int = 0  # the input width K of tiled MXFP4 stacks

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def out_dim(self) -> int:
        if self.layout == "mma_tiled":
            return self.weight.shape[1] * MXFP4_TILE_ROWS
        return self.weight.shape[1]

    @property
    def in_dim(self) -> int:
        if self.layout == "mma_tiled":
            return self.k
        if self.format == "mxfp4":
            return self.weight.shape[2] * 32
        return self.weight.shape[2]


# Steps of up to this many router logits (tokens x experts: gpt-oss-20b's 32 experts at 128
# tokens, qwen3-30b-a3b's 128 at 32) take the router GEMM on moe_router_logits, one launch;
# larger ones torch's GEMM, which is faster from there (docs/performance.md, "Router logits").
ROUTER_KERNEL_MAX_LOGITS = 4096


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  *, native: bool | None = None) -> torch.Tensor:
    """x [T, H] @ weight [E, H]^T (+ bias [E]) in x's dtype. native: moe_router_logits (the CPU
    reference off the GPU); None: it on a GPU up to ROUTER_KERNEL_MAX_LOGITS logits, else
    F.linear."""
    if native is None:
        native = (x.device.type == "cuda"
                  and x.shape[0] * weight.shape[0] <= ROUTER_KERNEL_MAX_LOGITS)
    if not native:
        return F.linear(x, weight, bias)
    logits = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _C.moe_router_logits(as_ref(x), as_ref(weight), as_optional_ref(bias), as_ref(logits),
                         stream_handle(x.device))
    return logits


def route(router_logits: torch.Tensor, top_k: int, routing: str = "softmax_topk",
          renormalize: bool = True, block_m: int | None = None,
          plan: GemmPlan | None = None) -> Routing:
    """router_logits [T, E] -> Routing (see moelora/moe.h moe_route for the exact rules). The
    blocks have `block_m` rows, else the plan's, else those of the dense plan of this step."""
    num_tokens, num_experts = router_logits.shape
    if block_m is None:
        if plan is None:
            block_m = plan_expert_gemm(num_tokens * top_k, num_experts, "dense").block_m
        else:
            block_m = plan.block_m
    device = router_logits.device
    max_blocks = _C.moe_route_max_blocks(num_tokens * top_k, num_experts, block_m)
    topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    sorted_pairs = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=device)
    expert_counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    workspace = None
    if device.type == "cuda":
        nbytes = _C.moe_route_workspace_bytes(num_tokens, num_experts, True)
        if nbytes:
            workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
    _C.moe_route(as_ref(router_logits), top_k, _code(ROUTINGS, routing, "routing"),
                 renormalize, block_m, as_ref(topk_ids), as_ref(topk_weights),
                 as_ref(sorted_pairs), as_ref(block_expert), as_ref(num_blocks),
                 as_ref(expert_counts), stream_handle(device), as_optional_ref(workspace))
    return Routing(topk_ids, topk_weights, sorted_pairs, block_expert, num_blocks,
                   expert_counts, block_m, plan)


def _bytes(t: torch.Tensor | None) -> torch.Tensor | None:
    """FP8 payloads cross the boundary as their uint8 bytes."""
    if t is not None and t.dtype in (torch.float8_e4m3fn,):
        return t.view(torch.uint8)
    return t


def expert_gemm(input: torch.Tensor, routing: Routing, weights: ExpertWeights, *,
                input_pairs_per_row: int, activation: str = "none",
                swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                topk_weights: torch.Tensor | None = None, out: torch.Tensor | None = None,
                kernel: str = "auto", stream_consumers: int = 0, splits: int = 1,
                workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Row p of the result = epilogue(input[p // input_pairs_per_row] @ W[expert(p)]^T + bias):
    [P, N], or [P, N/2] for a gated activation; times topk_weights[p] (float32 [P]) if given.

    kernel: one of GEMM_KERNELS, or "auto": on a GPU the routing's plan (falling back to the
    tiled or simple kernel when the planned one cannot take the call), else the library's
    choice. A kernel named here that cannot take the call is an error; stream_consumers and
    splits (the tiled kernel's split-K ways, SPLIT_BY_SHAPE: split_k_ways) go with it.
    workspace: float32 scratch of at least splits * P * N elements for the splits' partial
    sums (default: allocated here when the GEMM splits). The CPU runs its reference for every
    native kernel."""
    num_pairs = input.shape[0] * input_pairs_per_row
    width = weights.out_dim // 2 if activation != "none" else weights.out_dim
    if out is None:
        out = input.new_empty(num_pairs, width)
    fall_back = kernel == "auto" and routing.plan is not None and input.is_cuda
    consumers = stream_consumers
    if fall_back:
        kernel, consumers = routing.plan.kernel, routing.plan.stream_consumers
        splits = routing.plan.splits
    if kernel == GROUPED:
        why = _grouped_refusal(input, weights)
        if not why:
            return _grouped_gemm(input, input_pairs_per_row, routing, weights, activation,
                                 swiglu_alpha, swiglu_limit, topk_weights, out)
        if not fall_back:
            raise ValueError(f"expert_gemm: the grouped GEMM cannot take this call: {why}")
        kernel = "tensor_core"
    if splits == SPLIT_BY_SHAPE:
        tiled = kernel in ("tensor_core", "auto")
        splits = gemm_splits(input, routing, weights, activation != "none") if tiled else 1
    if splits > 1 and workspace is None and input.is_cuda:
        workspace = torch.empty(splits * num_pairs * weights.out_dim, dtype=torch.float32,
                                device=input.device)
    _C.moe_expert_gemm(
        as_ref(input), input_pairs_per_row, _code(FORMATS, weights.format, "format"),
        as_ref(_bytes(weights.weight)), as_optional_ref(weights.scales),
        as_optional_ref(weights.bias), weights.block_n, weights.block_k,
        _code(MXFP4_LAYOUTS, weights.layout, "layout"), as_ref(routing.sorted_pairs),
        as_ref(routing.block_expert), as_ref(routing.num_blocks), routing.block_m,
        _code(ACTIVATIONS, activation, "activation"), swiglu_alpha, swiglu_limit,
        as_optional_ref(topk_weights), as_ref(out), stream_handle(input.device),
        _code(KERNELS, kernel, "kernel"), fall_back, consumers, splits,
        as_optional_ref(workspace))
    return out


def gemm_splits(input: torch.Tensor, routing: Routing, weights: ExpertWeights,
                gated: bool) -> int:
    """split_k_ways of the tiled kernel's grid for this GEMM on input's GPU (1 on the CPU and
    for block sizes that do not split)."""
    if not input.is_cuda or routing.block_m not in SPLIT_BLOCK_M:
        return 1
    ctas, k_steps = tiled_grid(weights, gated, routing.block_m, routing.num_pairs,
                               routing.top_k)
    return split_k_ways(ctas, k_steps, _sm_count(input.device.index or 0),
                        dense=weights.format == "dense")


def dequantize(weights: ExpertWeights, first_expert: int = 0, count: int | None = None,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Experts [first_expert, first_expert + count) as dense [count, N, K] in `dtype`, exactly
    the values expert_gemm multiplies by (moe_dequantize)."""
    if count is None:
        count = weights.num_experts - first_expert
    out = torch.empty(count, weights.out_dim, weights.in_dim, dtype=dtype,
                      device=weights.weight.device)
    _C.moe_dequantize(_code(FORMATS, weights.format, "format"), as_ref(_bytes(weights.weight)),
                      as_optional_ref(weights.scales), weights.block_n, weights.block_k,
                      _code(MXFP4_LAYOUTS, weights.layout, "layout"), first_expert, as_ref(out),
                      stream_handle(out.device))
    return out


# ---- the MXFP4 mma layout (src/mxfp4_layout.h) ------------------------------------------------

MXFP4_REPACK_CHUNK_BYTES = 256 << 20  # bounds the int32 temporaries of a repack


@functools.cache
def _mxfp4_moves() -> list[tuple[int, int, int]]:
    """The word permutation as grouped shifts, from the library's table
    (_C.MXFP4_MMA_POSITIONS[element][bit] = bit of the mma word): (shift, checkpoint mask,
    mma mask) per displacement."""
    moved: dict[int, int] = {}
    for element, positions in enumerate(_C.MXFP4_MMA_POSITIONS):
        for bit, position in enumerate(positions):
            source = 4 * element + bit
            moved[position - source] = moved.get(position - source, 0) | 1 << source
    return [(shift, mask, (mask << shift if shift > 0 else mask >> -shift) & 0xFFFFFFFF)
            for shift, mask in sorted(moved.items())]


def _as_int32(mask: int) -> int:
    return mask - (1 << 32) if mask >= 1 << 31 else mask


def _permute_words(words: torch.Tensor, to_mma: bool) -> torch.Tensor:
    """int32 words permuted (to_mma) or put back. Arithmetic right shifts copy the sign into
    the top bits; the mask after each shift clears them."""
    out = torch.zeros_like(words)
    for shift, checkpoint_mask, mma_mask in _mxfp4_moves():
        by, mask = (shift, mma_mask) if to_mma else (-shift, checkpoint_mask)
        moved = words << by if by > 0 else words >> -by
        out |= moved.bitwise_and_(_as_int32(mask))
    return out


def _repack_mxfp4(blocks: torch.Tensor, out: torch.Tensor | None, to_mma: bool) -> torch.Tensor:
    if blocks.dtype != torch.uint8 or blocks.dim() < 2 or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks must be uint8 [..., 16], got {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    if out is None:
        out = torch.empty(blocks.shape, dtype=torch.uint8, device=blocks.device)
    elif out.shape != blocks.shape or out.dtype != torch.uint8 or out.device != blocks.device:
        raise ValueError("out must be a uint8 tensor of the blocks' shape on their device")
    per_index = max(1, blocks[0].numel())
    step = max(1, MXFP4_REPACK_CHUNK_BYTES // per_index)
    for first in range(0, blocks.shape[0], step):  # chunks along dim 0; out may be blocks
        words = blocks[first:first + step].contiguous().view(torch.int32)
        out[first:first + step] = _permute_words(words, to_mma).view(torch.uint8)
    return out


def mxfp4_to_mma_layout(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """MXFP4 blocks uint8 [..., 16] (checkpoint layout) with every 32-bit word permuted into the
    mma layout, on the blocks' device; `out` may be `blocks` (in place). Slices of whole blocks
    keep the layout, so a stack may be cut (experts, rows, tensor-parallel K) before or after."""
    return _repack_mxfp4(blocks, out, to_mma=True)


def mxfp4_from_mma_layout(blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of mxfp4_to_mma_layout: the checkpoint's bytes back."""
    return _repack_mxfp4(blocks, out, to_mma=False)


def mxfp4_to_tiled_layout(blocks: torch.Tensor, scales: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 blocks uint8 [E, N, K/32, 16] in the mma layout and their scales [E, N, K/32] as
    the "mma_tiled" layout: tiles of 16 rows stored k-step-major, [E, N/16, S, 16, 64] and
    [E, N/16, S, 16, 4] with S = ceil(K/128) k-steps of four blocks; padding blocks hold code 0
    and scale 127. N must be a multiple of 16. New tensors on the blocks' device."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks must be uint8 [E, N, K/32, 16], got {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    e, n, k_blocks, _ = blocks.shape
    if scales.dtype != torch.uint8 or tuple(scales.shape) != (e, n, k_blocks):
        raise ValueError(f"MXFP4 scales must be uint8 {(e, n, k_blocks)}, got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if n % MXFP4_TILE_ROWS:
        raise ValueError(f"the tiled layout needs rows in whole tiles of {MXFP4_TILE_ROWS}, "
                         f"got {n}")
    steps = -(-k_blocks // MXFP4_STEP_BLOCKS)
    tiles_n, width = n // MXFP4_TILE_ROWS, steps * MXFP4_STEP_BLOCKS
    tiles = blocks.new_empty(e, tiles_n, steps, MXFP4_TILE_ROWS, 64)
    tile_scales = scales.new_empty(e, tiles_n, steps, MXFP4_TILE_ROWS, MXFP4_STEP_BLOCKS)
    # A few experts at a time: the padded copies stay small beside a large model's weights.
    chunk = max(1, MXFP4_REPACK_CHUNK_BYTES // max(1, n * width * 16))
    for first in range(0, e, chunk):
        part = slice(first, first + chunk)
        count = blocks[part].shape[0]
        padded = blocks.new_zeros(count, n, width, 16)
        padded[:, :, :k_blocks] = blocks[part]
        tiles[part] = padded.view(count, tiles_n, MXFP4_TILE_ROWS, steps, 64).transpose(2, 3)
        padded_scales = scales.new_full((count, n, width), 127)
        padded_scales[:, :, :k_blocks] = scales[part]
        tile_scales[part] = padded_scales.view(count, tiles_n, MXFP4_TILE_ROWS, steps,
                                               MXFP4_STEP_BLOCKS).transpose(2, 3)
    return tiles, tile_scales


def mxfp4_from_tiled_layout(tiles: torch.Tensor, tile_scales: torch.Tensor, k: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of mxfp4_to_tiled_layout for an input width k: blocks [E, N, k/32, 16] and
    scales [E, N, k/32], new contiguous tensors."""
    e, tiles_n, steps, rows, width = tiles.shape
    k_blocks = k // 32
    if (rows, width) != (MXFP4_TILE_ROWS, 64) or not 0 < k_blocks <= steps * MXFP4_STEP_BLOCKS:
        raise ValueError(f"MXFP4 tiles of width {k} must be [E, N/16, ceil(K/128), 16, 64], got "
                         f"{tuple(tiles.shape)}")
    n = tiles_n * MXFP4_TILE_ROWS
    blocks = tiles.permute(0, 1, 3, 2, 4).reshape(e, n, steps * MXFP4_STEP_BLOCKS, 16)
    scales = tile_scales.permute(0, 1, 3, 2, 4).reshape(e, n, steps * MXFP4_STEP_BLOCKS)
    return blocks[:, :, :k_blocks].contiguous(), scales[:, :, :k_blocks].contiguous()


# ---- the grouped form (torch._grouped_mm on expert-sorted rows) -------------------------------

def _grouped_refusal(input: torch.Tensor, weights: ExpertWeights) -> str:
    """Why torch._grouped_mm cannot take this call, or ""."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no _grouped_mm"
    if input.is_cuda and input.dtype != torch.bfloat16:
        return f"CUDA grouped GEMMs take bfloat16 activations, got {input.dtype}"
    if input.shape[1] % 8 or weights.out_dim % 8:
        return "widths must be multiples of 8 (16-byte rows)"
    if weights.format == "dense" and weights.weight.dtype != input.dtype:
        return "dense weights must have the activations' dtype"
    if weights.format != "dense" and input.is_cuda and torch.cuda.is_current_stream_capturing():
        return ("a quantized stack's grouped form reads the expert counts on the host, which a "
                "CUDA graph capture cannot")
    return ""


def _grouped_mm(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """rows [R, K] sorted by expert (counts[e] rows each) @ weight[e]^T -> [R, N]."""
    offsets = counts.cumsum(0).to(torch.int32)
    return torch._grouped_mm(rows, weight.transpose(1, 2), offs=offsets)


def _grouped_dequantized(rows: torch.Tensor, weights: ExpertWeights,
                         counts: torch.Tensor) -> torch.Tensor:
    """_grouped_mm over a quantized stack, dequantized GROUPED_SCRATCH_BYTES at a time. Reads
    the counts on the host (one sync): the plan picks this form only for prefill steps."""
    n, k = weights.out_dim, weights.in_dim
    chunk = max(1, GROUPED_SCRATCH_BYTES // (n * k * rows.element_size()))
    host_counts = counts.tolist()
    acc = rows.new_empty(rows.shape[0], n)
    start = 0
    for first in range(0, weights.num_experts, chunk):
        last = min(weights.num_experts, first + chunk)
        taken = sum(host_counts[first:last])
        if taken:
            dense = dequantize(weights, first, last - first, rows.dtype)
            acc[start:start + taken] = _grouped_mm(rows[start:start + taken], dense,
                                                   counts[first:last])
        start += taken
    return acc


def _grouped_gemm(input, input_pairs_per_row, routing, weights, activation, alpha, limit,
                  topk_weights, out):
    """expert_gemm's contract over torch: the product is rounded to the activations' dtype
    before the epilogue (the native kernels keep it in float32)."""
    expert_of_pair = routing.topk_ids.reshape(-1)
    order = torch.argsort(expert_of_pair, stable=True)  # pairs grouped by expert, no host sync
    rows = input[order // input_pairs_per_row]
    counts = routing.expert_counts
    if weights.format == "dense":
        acc = _grouped_mm(rows, weights.weight, counts)
    else:
        acc = _grouped_dequantized(rows, weights, counts)
    bias = None if weights.bias is None else weights.bias.float()
    experts = expert_of_pair[order].long()
    row_weight = None if topk_weights is None else topk_weights.reshape(-1)[order]
    result = out.new_empty(acc.shape[0], out.shape[1])
    for start in range(0, acc.shape[0], GROUPED_EPILOGUE_ROWS):  # bounded float32 temporaries
        chunk = slice(start, start + GROUPED_EPILOGUE_ROWS)
        value = acc[chunk].float()
        if bias is not None:
            value = value + bias[experts[chunk]]
        if activation != "none":
            inter = value.shape[1] // 2
            gate, up = value[:, :inter], value[:, inter:]
            if activation == "silu":
                value = F.silu(gate) * up
            else:
                _code(ACTIVATIONS, activation, "activation")
                gate = gate.clamp(max=limit)
                up = up.clamp(-limit, limit)
                value = (up + 1) * (gate * torch.sigmoid(gate * alpha))
        if row_weight is not None:
            value = value * row_weight[chunk, None]
        result[chunk] = value
    out[order] = result
    return out


def activation(h13: torch.Tensor, kind: str, swiglu_alpha: float = 1.702,
               swiglu_limit: float = 7.0, out: torch.Tensor | None = None,
               addend: torch.Tensor | None = None) -> torch.Tensor:
    """h13 [P, 2I] ([gate | up]) (+ addend [P, 2I], in float32) -> h [P, I]."""
    if out is None:
        out = h13.new_empty(h13.shape[0], h13.shape[1] // 2)
    _C.moe_activation(as_ref(h13), _code(ACTIVATIONS, kind, "activation"), swiglu_alpha,
                      swiglu_limit, as_ref(out), stream_handle(h13.device),
                      as_optional_ref(addend))
    return out


def moe_sum(y: torch.Tensor, top_k: int, out: torch.Tensor | None = None,
            addend: torch.Tensor | None = None) -> torch.Tensor:
    """y [T*K, H] (+ addend [T*K, H]) -> out [T, H], summed over k in order, in float32."""
    if out is None:
        out = y.new_empty(y.shape[0] // top_k, y.shape[1])
    _C.moe_sum(as_ref(y), top_k, as_ref(out), stream_handle(y.device), as_optional_ref(addend))
    return out


__all__ = [
    "ACTIVATIONS",
    "FORMATS",
    "GEMM_KERNELS",
    "GEMM_PLAN",
    "GROUPED",
    "KERNELS",
    "MAX_EXPERTS",
    "MXFP4_LAYOUTS",
    "ROUTER_KERNEL_MAX_LOGITS",
    "ROUTINGS",
    "SPLIT_BLOCK_M",
    "SPLIT_BY_SHAPE",
    "STREAM_BLOCK_M",
    "TENSOR_CORE_BLOCK_M",
    "ExpertWeights",
    "GemmPlan",
    "Routing",
    "activation",
    "dequantize",
    "expert_gemm",
    "gemm_splits",
    "moe_sum",
    "mxfp4_from_mma_layout",
    "mxfp4_from_tiled_layout",
    "mxfp4_to_mma_layout",
    "mxfp4_to_tiled_layout",
    "plan_expert_gemm",
    "route",
    "router_logits",
    "split_k_ways",
    "tiled_grid",
]
