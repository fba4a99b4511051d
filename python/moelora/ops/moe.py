"""The fused MoE layer's ops (include/moelora/moe.h): routing, expert GEMMs over weights kept as
stored (dense, MXFP4, block FP8), the gated activation and the sum over top-k.

One layer: ``route`` (router logits -> top-k, weights, expert blocks), ``expert_gemm`` for w13
(activation fused, or h13 then ``activation`` when a LoRA delta goes in between), ``expert_gemm``
for w2 with the routing weights, ``moe_sum``. Outputs are allocated here; every check is the
library's (``moelora.InvalidArgument`` naming the argument). Import as
``from moelora.ops import moe as moe_ops``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelora import _C
from moelora._tensor import as_optional_ref, as_ref, stream_handle

ROUTINGS = {"softmax_topk": 0, "topk_softmax": 1}
ACTIVATIONS = {"none": 0, "silu": 1, "gpt_oss": 2}
FORMATS = {"dense": 0, "mxfp4": 1, "fp8": 2}
KERNELS = {"auto": 0, "simple": 1, "tensor_core": 2}
# Rows per block the tensor-core kernels are built for; other sizes run the simple kernel.
TENSOR_CORE_BLOCK_M = (8, 16, 32, 64)
MAX_EXPERTS = _C.MOE_MAX_EXPERTS


def _code(table: dict, name: str, what: str) -> int:
    if name not in table:
        raise ValueError(f"{what} must be one of {sorted(table)}, got {name!r}")
    return table[name]


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

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def num_pairs(self) -> int:
        return self.topk_ids.numel()


@dataclass
class ExpertWeights:
    """One expert stack as stored (moelora/moe.h MoeExpertWeights): dense [E, N, K]; MXFP4
    blocks uint8 [E, N, K/32, 16] + scales uint8 [E, N, K/32]; FP8 float8_e4m3fn (or its uint8
    bytes) [E, N, K] + float32 scales [E, ceil(N/block_n), ceil(K/block_k)]."""

    format: str
    weight: torch.Tensor
    scales: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # [E, N]
    block_n: int = 0
    block_k: int = 0

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def out_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def in_dim(self) -> int:
        if self.format == "mxfp4":
            return self.weight.shape[2] * 32
        return self.weight.shape[2]


def gemm_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per expert block for a step of `num_pairs` pairs: at decode about four times the
    mean rows per touched expert (the kernels skip a block's empty 8-row tiles, so a roomy
    block costs nothing while a split expert reads its weights twice), 64 at prefill."""
    per_expert = num_pairs / max(1, min(num_experts, num_pairs))
    for block_m in TENSOR_CORE_BLOCK_M[:-1]:
        if 4 * per_expert <= block_m:
            return block_m
    return TENSOR_CORE_BLOCK_M[-1]


def route(router_logits: torch.Tensor, top_k: int, routing: str = "softmax_topk",
          renormalize: bool = True, block_m: int | None = None) -> Routing:
    """router_logits [T, E] -> Routing (see moelora/moe.h moe_route for the exact rules)."""
    num_tokens, num_experts = router_logits.shape
    if block_m is None:
        block_m = gemm_block_m(num_tokens * top_k, num_experts)
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
                   expert_counts, block_m)


def _bytes(t: torch.Tensor | None) -> torch.Tensor | None:
    """FP8 payloads cross the boundary as their uint8 bytes."""
    if t is not None and t.dtype in (torch.float8_e4m3fn,):
        return t.view(torch.uint8)
    return t


def expert_gemm(input: torch.Tensor, routing: Routing, weights: ExpertWeights, *,
                input_pairs_per_row: int, activation: str = "none",
                swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                topk_weights: torch.Tensor | None = None, out: torch.Tensor | None = None,
                kernel: str = "auto") -> torch.Tensor:
    """Row p of the result = epilogue(input[p // input_pairs_per_row] @ W[expert(p)]^T + bias):
    [P, N], or [P, N/2] for a gated activation; times topk_weights[p] (float32 [P]) if given."""
    num_pairs = input.shape[0] * input_pairs_per_row
    width = weights.out_dim // 2 if activation != "none" else weights.out_dim
    if out is None:
        out = input.new_empty(num_pairs, width)
    _C.moe_expert_gemm(
        as_ref(input), input_pairs_per_row, _code(FORMATS, weights.format, "format"),
        as_ref(_bytes(weights.weight)), as_optional_ref(weights.scales),
        as_optional_ref(weights.bias), weights.block_n, weights.block_k,
        as_ref(routing.sorted_pairs), as_ref(routing.block_expert), as_ref(routing.num_blocks),
        routing.block_m, _code(ACTIVATIONS, activation, "activation"), swiglu_alpha,
        swiglu_limit, as_optional_ref(topk_weights), as_ref(out), stream_handle(input.device),
        _code(KERNELS, kernel, "kernel"))
    return out


def activation(h13: torch.Tensor, kind: str, swiglu_alpha: float = 1.702,
               swiglu_limit: float = 7.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """h13 [P, 2I] ([gate | up]) -> h [P, I]."""
    if out is None:
        out = h13.new_empty(h13.shape[0], h13.shape[1] // 2)
    _C.moe_activation(as_ref(h13), _code(ACTIVATIONS, kind, "activation"), swiglu_alpha,
                      swiglu_limit, as_ref(out), stream_handle(h13.device))
    return out


def moe_sum(y: torch.Tensor, top_k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [T*K, H] -> out [T, H], summed over k in order, in float32."""
    if out is None:
        out = y.new_empty(y.shape[0] // top_k, y.shape[1])
    _C.moe_sum(as_ref(y), top_k, as_ref(out), stream_handle(y.device))
    return out


__all__ = [
    "ACTIVATIONS",
    "FORMATS",
    "KERNELS",
    "MAX_EXPERTS",
    "ROUTINGS",
    "TENSOR_CORE_BLOCK_M",
    "ExpertWeights",
    "Routing",
    "activation",
    "expert_gemm",
    "gemm_block_m",
    "moe_sum",
    "route",
]
