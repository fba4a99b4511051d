"""The LoRA delta kernels: fused_moe_lora (grouped and unsorted forms), dense_lora, and the
LoraSiteView over the adapter row tables. Which form and kernel a step takes: ops.plan_lora."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moelora import _C
from moelora._tensor import as_optional_ref, as_ref, dtype_code, stream_handle
from moelora.ops.plan import LoraPlan

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
    plan: LoraPlan | None = None,
) -> torch.Tensor:
    """output[p, col_i : col_i + out_i] += w[p] * (input[p // input_pairs_per_row] @ A_i^T) @ B_i^T.

    In place on ``output``; returns it. ``num_adapters``: distinct adapter slots among the pairs
    (known on the host at schedule time; None: unknown) sizes the GPU launch to the blocks those
    slots can fill rather than to every slot of the views (results do not depend on it).
    ``plan``: the step's LoraPlan (None: one made for this call).
    """
    _C.fused_moe_lora(
        as_ref(input),
        as_ref(output),
        list(slices),
        [int(c) for c in col_offsets],
        stream_handle(input.device),
        input_pairs_per_row=input_pairs_per_row,
        topk_weights=as_optional_ref(topk_weights),
        sorted_pairs=as_ref(sorted_pairs),
        block_slot=as_ref(block_slot),
        block_expert=as_ref(block_expert),
        num_blocks=as_ref(num_blocks),
        block_m=block_m,
        active_slots=int(num_adapters or 0),
        plan=plan,
    )
    return output


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
    plan: LoraPlan | None = None,
) -> torch.Tensor:
    """fused_moe_lora's delta without the alignment pass (decode): pair p = t * K + k uses slot
    token_slot[t] and expert topk_ids[t, k] (expert 0 when topk_ids is None). In place on
    ``output``; returns it."""
    _C.fused_moe_lora_unsorted(
        as_ref(input),
        as_ref(output),
        list(slices),
        [int(c) for c in col_offsets],
        stream_handle(input.device),
        input_pairs_per_row=input_pairs_per_row,
        topk_weights=as_optional_ref(topk_weights),
        topk_ids=as_optional_ref(topk_ids),
        token_slot=as_ref(token_slot),
        plan=plan,
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
    *,
    plan: LoraPlan | None = None,
) -> torch.Tensor:
    """output[t, col_i : col_i + out_i] += (input[t] @ A_i[slot]^T) @ B_i[slot]^T, in place."""
    _C.dense_lora(
        as_ref(input),
        as_ref(output),
        list(slices),
        [int(c) for c in col_offsets],
        stream_handle(input.device),
        sorted_pairs=as_ref(sorted_rows),
        block_slot=as_ref(block_slot),
        num_blocks=as_ref(num_blocks),
        block_m=block_m,
        plan=plan,
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
