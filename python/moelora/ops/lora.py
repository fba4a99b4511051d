"""The LoRA delta kernels: fused_moe_lora (grouped and unsorted forms), dense_lora, and the
LoraSiteView over the adapter row tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moelora import _C
from moelora._tensor import as_optional_ref, as_ref, dtype_code, stream_handle

LoraSiteView = _C.LoraSiteView


def fused_moe_lora(
    input: torch.Tensor,
    output: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_slot: torch.Tensor,
    block_expert: torch.Tensor,
    num_blocks: torch.Tensor,
    block_m: int,
    slices: Sequence[LoraSiteView],
    col_offsets: Sequence[int],
    *,
    input_pairs_per_row: int,
    topk_weights: torch.Tensor | None = None,
    num_adapters: int | None = None,
) -> torch.Tensor:
    """output[p, col_i : col_i + out_i] += w[p] * (input[p // input_pairs_per_row] @ A_i^T) @ B_i^T.

    In place on ``output``; returns it. ``num_adapters``: distinct adapter slots among the pairs
    (known on the host at schedule time; None: unknown) sizes the GPU launch to the blocks those
    slots can fill rather than to every slot of the views (results do not depend on it).
    """
    _C.fused_moe_lora(
        as_ref(input),
        input_pairs_per_row,
        as_ref(output),
        as_optional_ref(topk_weights),
        as_ref(sorted_pairs),
        as_ref(block_slot),
        as_ref(block_expert),
        as_ref(num_blocks),
        block_m,
        list(slices),
        [int(c) for c in col_offsets],
        stream_handle(input.device),
        int(num_adapters or 0),
    )
    return output


# The form of a step, from the decode form sweep of v3j (H200, both forms timed at 16-256 tokens
# x 4/8/16 adapters on the four presets; bench/results/h200-decode-forms-v3j.jsonl, NOTES "v3j"):
# - below GROUPED_FROM_PAIRS (token, k) pairs, unsorted (no alignment launch; weights shared by a
#   few pairs come from L2) won or tied every case, even at 2-8 pairs a group (mixtral 128
#   tokens / 16 adapters 145 us vs 229 grouped, gpt-oss 64/4 55 vs 86; ties: mixtral 32/4 52.0 vs
#   51.4, 128/4 135.8 vs 134.8). v3h's rule grouped from 2 pairs a group; the unsorted kernel's
#   16-byte shared-memory reads (v3j) took that away.
# - from it, grouping (on the tensor-core kernel, cuda/lora/dispatch.cu kMmaMinPairs) won every
#   case with at least GROUPED_MIN_PAIRS_PER_GROUP pairs per (adapter, expert) group (qwen3 128/4
#   77 vs 104, mixtral 256/16 216 vs 289), and lost every case under one (olmoe 64/16 109 vs 74,
#   qwen3 128/16 118 vs 114, 64/8 71.5 vs 70.3: the engine's 64-sequence qwen3 step, where the
#   offline benchmark measured 10.2 / 9.2 ms TPOT unsorted vs 10.7 / 10.7 grouped). Between one
#   and two it went both ways (grouped won gpt-oss 128/16 98 vs 112, olmoe 64/8, qwen3 64/4 by
#   8-14%; lost qwen3 128/8 135 vs 111, olmoe 128/16 144 vs 114, qwen3 256/16 226 vs 191), so
#   unsorted there: the smaller loss.
GROUPED_FROM_PAIRS = 512
GROUPED_MIN_PAIRS_PER_GROUP = 2
# A model with very few experts groups from this many pairs per expert at any step size (its
# blocks fill whatever the adapters); not in the sweep, whose fewest experts are mixtral's 8.
GROUPED_MIN_PAIRS_PER_EXPERT = 64


# Dense sites (attention projections): unsorted (one cluster per row) up to this many rows,
# grouped by adapter above. tools/dense_form_study.py on the H200 (bench/results/
# h200-dense-forms-v3j.jsonl; q / o / k projections of qwen3 and mixtral, rank 16, 4 and 16
# adapters): unsorted won every case up to 256 rows (256 rows: 18-26 us vs 30-34 grouped; 64
# rows: 12-15 vs 18-28), grouped every case at 512 (20-26 us, on the tensor-core kernel, vs
# 32-47). The grouping itself (6.5-7.9 us) runs once per step for every dense site, so it is
# not counted against either form.
UNSORTED_MAX_DENSE_ROWS = 256


# Grouped form: rows per block. With more than 8 pairs per (adapter, expert) group on average,
# blocks of 64 rows (the tensor-core kernel's 4-warp M tile); else 16 (1-warp CTAs, less
# padding). A sweep of block_m 16 / 32 / 64 x every cluster split on the H200 (bench/NOTES.md,
# v3f; tools/gpu_split_sweep.sh with BLOCK_MS) put the crossover between 8 and 16 pairs a group:
# at 8, 16 beat 64 by 1.18-1.30x (qwen3 2048 tokens / 16 adapters 346 -> 267 us, mixtral 512 / 16
# 196 -> 152); at 16 and more, 64 won or tied (32 never by more than 6%). The engine follows
# the same rule as the benchmark grid.
GROUPED_BLOCK_M_SMALL, GROUPED_BLOCK_M_LARGE = 16, 64
GROUPED_LARGE_BLOCK_PAIRS_PER_GROUP = 8


def grouped_block_m(num_pairs: int, num_experts: int, num_adapters: int | None) -> int:
    """block_m for moe_lora_align + fused_moe_lora over num_pairs (token, expert) pairs of
    num_adapters distinct adapters (None: unknown, taken as 1) and num_experts experts."""
    groups = max(1, (num_adapters or 1) * num_experts)
    if num_pairs / groups > GROUPED_LARGE_BLOCK_PAIRS_PER_GROUP:
        return GROUPED_BLOCK_M_LARGE
    return GROUPED_BLOCK_M_SMALL


def prefer_unsorted(num_pairs: int, dense: bool = False, num_experts: int | None = None,
                    num_adapters: int | None = None) -> bool:
    """Whether fused_moe_lora_unsorted is the faster form for a step of num_pairs (token,
    expert) pairs over num_experts experts and num_adapters distinct adapters (None: unknown),
    or of num_pairs rows of a dense site."""
    if dense:
        return num_pairs <= UNSORTED_MAX_DENSE_ROWS
    if num_experts and num_pairs >= GROUPED_MIN_PAIRS_PER_EXPERT * num_experts:
        return False
    if num_pairs < GROUPED_FROM_PAIRS:
        return True
    if num_experts and num_adapters:
        return num_pairs < GROUPED_MIN_PAIRS_PER_GROUP * num_experts * num_adapters
    return False


def fused_moe_lora_unsorted(
    input: torch.Tensor,
    output: torch.Tensor,
    topk_ids: torch.Tensor | None,
    token_slot: torch.Tensor,
    slices: Sequence[LoraSiteView],
    col_offsets: Sequence[int],
    *,
    input_pairs_per_row: int,
    topk_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """fused_moe_lora's delta without the alignment pass (decode): pair p = t * K + k uses slot
    token_slot[t] and expert topk_ids[t, k] (expert 0 when topk_ids is None). In place on
    ``output``; returns it."""
    _C.fused_moe_lora_unsorted(
        as_ref(input),
        input_pairs_per_row,
        as_ref(output),
        as_optional_ref(topk_weights),
        as_optional_ref(topk_ids),
        as_ref(token_slot),
        list(slices),
        [int(c) for c in col_offsets],
        stream_handle(input.device),
    )
    return output


def dense_lora(
    input: torch.Tensor,
    output: torch.Tensor,
    sorted_rows: torch.Tensor,
    block_slot: torch.Tensor,
    num_blocks: torch.Tensor,
    block_m: int,
    slices: Sequence[LoraSiteView],
    col_offsets: Sequence[int],
) -> torch.Tensor:
    """output[t, col_i : col_i + out_i] += (input[t] @ A_i[slot]^T) @ B_i[slot]^T, in place."""
    _C.dense_lora(
        as_ref(input),
        as_ref(output),
        as_ref(sorted_rows),
        as_ref(block_slot),
        as_ref(num_blocks),
        block_m,
        list(slices),
        [int(c) for c in col_offsets],
        stream_handle(input.device),
    )
    return output


def make_site_view(
    arena: torch.Tensor,
    row_offsets: torch.Tensor,
    ranks: torch.Tensor,
    *,
    num_experts: int,
    max_rank: int,
    in_dim: int,
    out_dim: int,
    dtype: torch.dtype,
) -> LoraSiteView:
    """A LoraSiteView over torch tensors (tests; a torch-owned arena).

    arena: uint8 bytes holding the rows. row_offsets: int64 [num_slots, ...] whose row s starts
    with slot s's [num_experts][2][max_rank] byte offsets (its slot stride is stride(0)).
    ranks: int32 [num_slots, ...]; element [s, 0] is slot s's rank. The view keeps the three
    tensors alive.
    """
    if arena.dtype != torch.uint8:
        raise TypeError(f"arena must be a uint8 tensor, got {arena.dtype}")
    if row_offsets.dtype != torch.int64 or row_offsets.dim() < 1:
        raise TypeError("row_offsets must be an int64 tensor [num_slots, ...]")
    if ranks.dtype != torch.int32 or ranks.dim() < 1:
        raise TypeError("ranks must be an int32 tensor [num_slots, ...]")
    if ranks.shape[0] != row_offsets.shape[0]:
        raise ValueError(
            f"ranks has {ranks.shape[0]} slots but row_offsets has {row_offsets.shape[0]}"
        )
    per_slot = num_experts * 2 * max_rank
    if row_offsets.shape[0] > 0 and row_offsets[0].numel() < per_slot:
        raise ValueError(
            f"row_offsets rows hold {row_offsets[0].numel()} entries, need "
            f"num_experts * 2 * max_rank = {per_slot}"
        )
    view = LoraSiteView(
        arena=arena.data_ptr(),
        row_offsets=row_offsets.data_ptr(),
        slot_stride=row_offsets.stride(0),
        ranks=ranks.data_ptr(),
        rank_slot_stride=ranks.stride(0),
        num_slots=row_offsets.shape[0],
        num_experts=num_experts,
        max_rank=max_rank,
        in_dim=in_dim,
        out_dim=out_dim,
        dtype=dtype_code(dtype),
    )
    view._keepalive = (arena, row_offsets, ranks)
    return view
