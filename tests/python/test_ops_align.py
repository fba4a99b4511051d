"""moe_lora_align on the CPU: exact grouping against an independent Python reference."""

from __future__ import annotations

import moelora
import pytest
import torch
from lora_fixtures import POPULARITIES, assign_slots, route_experts
from moelora import ops
from moelora._tensor import as_ref


def reference_align(topk_ids, token_slot, num_experts, num_slots, block_m):
    """Blocks in (slot, expert) order, ascending pair ids inside a group, -1 padding."""
    top_k = 1 if topk_ids is None else topk_ids.shape[1]
    groups: dict[tuple[int, int], list[int]] = {}
    for t, slot in enumerate(token_slot.tolist()):
        if slot < 0:
            continue
        for k in range(top_k):
            expert = 0 if topk_ids is None else int(topk_ids[t, k])
            groups.setdefault((slot, expert), []).append(t * top_k + k)
    pairs, slots, experts = [], [], []
    for (slot, expert) in sorted(groups):
        members = groups[(slot, expert)]
        padded = -(-len(members) // block_m) * block_m
        pairs += members + [-1] * (padded - len(members))
        slots += [slot] * (padded // block_m)
        experts += [expert] * (padded // block_m)
    return pairs, slots, experts


def check_align(topk_ids, token_slot, num_experts, num_slots, block_m):
    sorted_pairs, block_slot, block_expert, num_blocks = ops.moe_lora_align(
        topk_ids, token_slot, num_experts, num_slots, block_m
    )
    top_k = 1 if topk_ids is None else topk_ids.shape[1]
    max_blocks = ops.moe_lora_align_max_blocks(token_slot.numel() * top_k, num_experts, num_slots, block_m)
    assert block_slot.numel() == max_blocks and sorted_pairs.numel() == max_blocks * block_m
    ref_pairs, ref_slots, ref_experts = reference_align(topk_ids, token_slot, num_experts, num_slots, block_m)
    n = int(num_blocks.item())
    assert n == len(ref_slots) <= max_blocks
    assert sorted_pairs[: n * block_m].tolist() == ref_pairs
    assert block_slot[:n].tolist() == ref_slots
    assert block_expert[:n].tolist() == ref_experts
    # Tail padding.
    assert (sorted_pairs[n * block_m :] == -1).all()
    assert (block_slot[n:] == -1).all() and (block_expert[n:] == -1).all()
    # Every non-base pair exactly once; blocks homogeneous in (slot, expert).
    used = sorted_pairs[sorted_pairs >= 0].tolist()
    expected = [
        t * top_k + k for t, s in enumerate(token_slot.tolist()) if s >= 0 for k in range(top_k)
    ]
    assert sorted(used) == expected and len(set(used)) == len(used)
    for b in range(n):
        for p in sorted_pairs[b * block_m : (b + 1) * block_m].tolist():
            if p < 0:
                continue
            t, k = divmod(p, top_k)
            assert int(token_slot[t]) == int(block_slot[b])
            assert (0 if topk_ids is None else int(topk_ids[t, k])) == int(block_expert[b])


CASES = [
    # tokens, top_k, experts, slots, block_m
    (1, 1, 1, 1, 1),
    (7, 2, 8, 5, 4),
    (133, 4, 13, 6, 16),
    (133, 1, 8, 3, 1),
    (7, 4, 13, 9, 16),
]


@pytest.mark.parametrize("tokens,top_k,experts,num_slots,block_m", CASES)
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_align_matches_reference(tokens, top_k, experts, num_slots, block_m, popularity):
    ranks = [8] * num_slots
    token_slot = assign_slots(tokens, ranks, popularity, seed=tokens + block_m)
    topk_ids = route_experts(tokens, top_k, experts, seed=tokens * 3 + top_k)
    check_align(topk_ids, token_slot, experts, num_slots, block_m)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_dense_rows_without_topk(block_m):
    token_slot = assign_slots(133, [4, 8, 16], "zipf", seed=block_m)
    check_align(None, token_slot, 1, 3, block_m)


def test_align_all_base_tokens_gives_no_blocks():
    token_slot = torch.full((7,), -1, dtype=torch.int32)
    sorted_pairs, block_slot, _, num_blocks = ops.moe_lora_align(
        torch.zeros(7, 2, dtype=torch.int32), token_slot, 4, 3, 4
    )
    assert int(num_blocks.item()) == 0
    assert (sorted_pairs == -1).all() and (block_slot == -1).all()


def test_align_non_contiguous_topk_ids():
    topk_full = route_experts(133, 4, 13, seed=5)
    topk_ids = topk_full[:, ::2]  # column-strided view
    token_slot = assign_slots(133, [4] * 4, "uniform", seed=9)
    check_align(topk_ids, token_slot, 13, 4, 4)


def test_align_max_blocks_is_tight_for_worst_case():
    # Every pair in its own group: each group needs a full block.
    assert ops.moe_lora_align_max_blocks(8, 8, 1, 16) == 8
    assert ops.moe_lora_align_max_blocks(64, 1, 1, 16) == 4
    assert ops.moe_lora_align_max_blocks(0, 8, 4, 16) == 1


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"token_slot": torch.tensor([0, 3], dtype=torch.int32)}, "token_slot"),
        ({"topk_ids": torch.tensor([[0], [9]], dtype=torch.int32)}, "topk_ids"),
        ({"topk_ids": torch.zeros(2, 1, dtype=torch.int64)}, "topk_ids"),
        ({"token_slot": torch.zeros(2, dtype=torch.int64)}, "token_slot"),
        ({"block_m": 0}, "block_m"),
        ({"topk_ids": torch.zeros(3, 1, dtype=torch.int32)}, "topk_ids"),
    ],
)
def test_align_rejects_bad_arguments(kwargs, arg):
    args = {
        "topk_ids": torch.zeros(2, 1, dtype=torch.int32),
        "token_slot": torch.zeros(2, dtype=torch.int32),
        "num_experts": 4,
        "num_slots": 3,
        "block_m": 4,
    }
    args.update(kwargs)
    with pytest.raises(moelora.InvalidArgument, match=arg):
        ops.moe_lora_align(**args)


def test_align_rejects_undersized_outputs():
    token_slot = torch.zeros(7, dtype=torch.int32)
    small = torch.empty(1, dtype=torch.int32)
    with pytest.raises(moelora.InvalidArgument, match="block_slot"):
        moelora._C.moe_lora_align(
            None, as_ref(token_slot), 1, 1, 1, as_ref(small), as_ref(small),
            as_ref(small), as_ref(torch.empty(1, dtype=torch.int32)), 0, None,
        )


def test_align_workspace_is_not_needed_on_the_cpu():
    assert moelora._C.moe_lora_align_workspace_bytes(9000, 128, 16, False) == 0
    with pytest.raises(moelora.InvalidArgument, match="num_pairs must be >= 0"):
        moelora._C.moe_lora_align_workspace_bytes(-1, 8, 4, False)
    with pytest.raises(moelora.InvalidArgument, match="num_experts must be positive"):
        moelora._C.moe_lora_align_workspace_bytes(10, 0, 4, False)
    # a workspace passed on the CPU is accepted and ignored
    topk_ids = route_experts(33, 2, 8, 1)
    token_slot = assign_slots(33, [4, 8, 16], "zipf", 2)
    expected = ops.moe_lora_align(topk_ids, token_slot, 8, 3, 4)
    outs = [torch.empty_like(t) for t in expected]
    moelora._C.moe_lora_align(
        as_ref(topk_ids), as_ref(token_slot), 8, 3, 4, *(as_ref(t) for t in outs), 0,
        as_ref(torch.empty(5, dtype=torch.uint8)),
    )
    for got, want in zip(outs, expected):
        assert torch.equal(got, want)
