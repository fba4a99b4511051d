"""moe_lora_align: groups (token, k) pairs by (adapter slot, expert) into blocks."""

from __future__ import annotations

import torch

from moelora import _C
from moelora._tensor import as_optional_ref, as_ref, stream_handle
from moelora.ops.plan import LoraPlan


def moe_lora_align_max_blocks(num_pairs: int, num_experts: int, num_slots: int, block_m: int) -> int:
    """Upper bound on the blocks moe_lora_align can produce (sizes its outputs)."""
    return _C.moe_lora_align_max_blocks(num_pairs, num_experts, num_slots, block_m)


def moe_lora_align(
    topk_ids: torch.Tensor | None,
    token_slot: torch.Tensor,
    num_experts: int,
    num_slots: int,
    block_m: int,
    *,
    plan: LoraPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups (token, k) pairs by (slot, expert) into blocks of block_m rows.

    ``topk_ids`` None means dense rows (K = 1, expert 0). Returns (sorted_pairs, block_slot,
    block_expert, num_blocks), int32, sized by moe_lora_align_max_blocks; the tail is -1.
    On a GPU the kernels' counters come from torch's allocator (a workspace the op passes in), so
    a captured graph holds no memory nodes between this launch and the next. ``plan``: the step's
    LoraPlan, which picks the kernel (None: one made for this call).
    """
    top_k = 1 if topk_ids is None else topk_ids.shape[1]
    num_pairs = token_slot.shape[0] * top_k
    max_blocks = moe_lora_align_max_blocks(num_pairs, num_experts, num_slots, block_m)
    device = token_slot.device
    sorted_pairs = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_slot = torch.empty(max_blocks, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=device)
    workspace = None
    if device.type == "cuda":  # sized for the current device, which runs the kernels
        nbytes = _C.moe_lora_align_workspace_bytes(num_pairs, num_experts, num_slots, True, plan)
        if nbytes > 0:
            workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
    _C.moe_lora_align(
        as_optional_ref(topk_ids),
        as_ref(token_slot),
        num_experts,
        num_slots,
        block_m,
        as_ref(sorted_pairs),
        as_ref(block_slot),
        as_ref(block_expert),
        as_ref(num_blocks),
        stream_handle(device),
        as_optional_ref(workspace),
        plan,
    )
    return sorted_pairs, block_slot, block_expert, num_blocks
