"""fused_moe_lora on the CPU against a float64 torch reference written here."""

from __future__ import annotations

import itertools

import moelora
import pytest
import torch
from lora_fixtures import POPULARITIES, assign_slots, make_lora_site, route_experts
from moelora import ops

# (rtol, atol) against the float64 reference rounded to the output dtype.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLOT_RANKS = [4, 8, 0, 16, 64, 8]  # mixed, with one slot that targets nothing


def strided_rows(rows: int, cols: int, dtype, gen, pad: int = 5, fill=None) -> torch.Tensor:
    """A [rows, cols] view with row stride cols + pad (the pad columns hold NaN)."""
    full = torch.full((rows, cols + pad), float("nan"), dtype=torch.float64)
    values = torch.randn(rows, cols, generator=gen, dtype=torch.float64) if fill is None else fill
    full[:, :cols] = values
    return full.to(dtype)[:, :cols]


def reference_delta(x64, token_slot, topk_ids, weights, sites, col_offsets, width, pairs_per_row):
    """float64 [P, width] of deltas and a bool mask of the elements the op must write."""
    top_k = topk_ids.shape[1]
    num_pairs = token_slot.numel() * top_k
    delta = torch.zeros(num_pairs, width, dtype=torch.float64)
    written = torch.zeros(num_pairs, width, dtype=torch.bool)
    for p in range(num_pairs):
        t, k = divmod(p, top_k)
        slot = int(token_slot[t])
        if slot < 0:
            continue
        expert = int(topk_ids[t, k])
        w = 1.0 if weights is None else float(weights[p])
        for site, col in zip(sites, col_offsets):
            d = site.delta(x64[p // pairs_per_row], slot, expert)
            if d is not None:
                delta[p, col : col + site.out_dim] = w * d
                written[p, col : col + site.out_dim] = True
    return delta, written


def run_case(tokens, hidden, inter, top_k, experts, popularity, block_m, dtype, use_weights, stage,
             form="grouped"):
    seed = tokens * 1000 + hidden + top_k * 7 + experts + block_m
    gen = torch.Generator().manual_seed(seed)
    token_slot = assign_slots(tokens, SLOT_RANKS, popularity, seed)
    topk_ids = route_experts(tokens, top_k, experts, seed + 1)
    num_pairs = tokens * top_k
    if stage == "w13":
        # gate and up, with a 3-column gap between them that must stay untouched
        sites = [
            make_lora_site(SLOT_RANKS, experts, hidden, inter, dtype, seed + 2),
            make_lora_site(SLOT_RANKS[::-1], experts, hidden, inter, dtype, seed + 3),
        ]
        col_offsets, width, pairs_per_row = [0, inter + 3], 2 * inter + 3, top_k
        x = strided_rows(tokens, hidden, dtype, gen)
    else:
        sites = [make_lora_site(SLOT_RANKS, experts, inter, hidden, dtype, seed + 2)]
        col_offsets, width, pairs_per_row = [0], hidden, 1
        x = strided_rows(num_pairs, inter, dtype, gen)
    weights = torch.rand(num_pairs, generator=gen) if use_weights else None
    x64 = x.double()
    delta, written = reference_delta(
        x64, token_slot, topk_ids, weights, sites, col_offsets, width, pairs_per_row
    )
    # Base output: random where written, NaN (poison) everywhere else incl. the row padding.
    base64 = torch.randn(num_pairs, width, generator=gen, dtype=torch.float64)
    base64[~written] = float("nan")
    output = strided_rows(num_pairs, width, dtype, gen, fill=base64)
    expected = (output.double() + delta).to(dtype)
    before = output.clone()
    padding_before = output.as_strided((num_pairs, 5), (output.stride(0), 1), width).clone()

    if form == "unsorted":
        ops.fused_moe_lora_unsorted(x, output, topk_ids, token_slot, [s.view for s in sites],
                                    col_offsets, input_pairs_per_row=pairs_per_row,
                                    topk_weights=weights)
    else:
        sorted_pairs, block_slot, block_expert, num_blocks = ops.moe_lora_align(
            topk_ids, token_slot, experts, len(SLOT_RANKS), block_m
        )
        ops.fused_moe_lora(
            x, output, sorted_pairs, block_slot, block_expert, num_blocks, block_m,
            [s.view for s in sites], col_offsets,
            input_pairs_per_row=pairs_per_row, topk_weights=weights,
        )
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(output[written].double(), expected[written].double(), rtol=rtol, atol=atol)
    assert torch.isnan(output[~written]).all(), "op wrote outside the pairs/columns it owns"
    assert torch.equal(output[~written].isnan(), before[~written].isnan())
    padding_after = output.as_strided((num_pairs, 5), (output.stride(0), 1), width)
    assert torch.isnan(padding_after).all() and torch.isnan(padding_before).all()


def _cases():
    """Each popularity x dtype once, with shapes, top_k, experts and block_m rotating."""
    cases = []
    shapes = [(1, 111, 37), (7, 64, 37), (133, 111, 37)]
    for i, (popularity, dtype) in enumerate(itertools.product(POPULARITIES, DTYPES)):
        tokens, hidden, inter = shapes[i % 3]
        top_k = [1, 2, 4][(i // 3) % 3]
        experts = [1, 8, 13][(i + 1) % 3]
        top_k = min(top_k, experts)
        block_m = [1, 4, 16][(i // 2) % 3]
        cases.append((tokens, hidden, inter, top_k, experts, popularity, block_m, dtype, i % 2 == 0))
    return cases


@pytest.mark.parametrize("stage", ["w13", "w2"])
@pytest.mark.parametrize(
    "tokens,hidden,inter,top_k,experts,popularity,block_m,dtype,use_weights", _cases()
)
def test_fused_moe_lora_matches_reference(
    tokens, hidden, inter, top_k, experts, popularity, block_m, dtype, use_weights, stage
):
    run_case(tokens, hidden, inter, top_k, experts, popularity, block_m, dtype, use_weights, stage)


@pytest.mark.parametrize("stage", ["w13", "w2"])
@pytest.mark.parametrize(
    "tokens,hidden,inter,top_k,experts,popularity,block_m,dtype,use_weights", _cases()[::2]
)
def test_fused_moe_lora_unsorted_matches_reference(
    tokens, hidden, inter, top_k, experts, popularity, block_m, dtype, use_weights, stage
):
    run_case(tokens, hidden, inter, top_k, experts, popularity, block_m, dtype, use_weights, stage,
             form="unsorted")


def test_fused_moe_lora_unsorted_rejects_bad_shapes():
    site = make_lora_site(SLOT_RANKS, 4, 16, 8, torch.float32, 0)
    x = torch.zeros(3, 16)
    out = torch.zeros(6, 8)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    slots = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(moelora.InvalidArgument, match="input_pairs_per_row must be 1 .* or top_k"):
        ops.fused_moe_lora_unsorted(x, out, ids, slots, [site.view], [0], input_pairs_per_row=3)
    with pytest.raises(moelora.InvalidArgument, match="output"):
        ops.fused_moe_lora_unsorted(x, out[:5], ids, slots, [site.view], [0], input_pairs_per_row=2)
    with pytest.raises(moelora.InvalidArgument, match="topk_ids must be contiguous"):
        ops.fused_moe_lora_unsorted(x, out, torch.zeros(2, 3, dtype=torch.int32).T, slots,
                                    [site.view], [0], input_pairs_per_row=2)
    with pytest.raises(moelora.InvalidArgument, match="token_slot"):
        ops.fused_moe_lora_unsorted(x, out, ids, slots.long(), [site.view], [0],
                                    input_pairs_per_row=2)


def test_fused_moe_lora_large_batch_uses_threads_correctly():
    # Large enough that the CPU kernel splits blocks across threads.
    run_case(133, 256, 96, 4, 8, "uniform", 4, torch.float32, True, "w2")


def test_fused_moe_lora_whole_numbers_are_exact():
    # Small integers: every product and sum is exact in float32, so results must match bit for bit.
    experts, tokens, dim = 3, 7, 9
    site = make_lora_site([2, 4], experts, dim, dim, torch.float32, seed=11)
    for slot in range(2):
        for e in range(experts):
            site.a[slot][e].copy_(torch.randint(-2, 3, site.a[slot][e].shape).double())
            site.b[slot][e].copy_(torch.randint(-2, 3, site.b[slot][e].shape).double())
    # Re-pack the integer weights into the arena through the row table.
    arena = site.view._keepalive[0]
    table = site.view._keepalive[1]
    for slot, rank in enumerate(site.ranks):
        for e in range(experts):
            for r in range(rank):
                for is_b, row in ((0, site.a[slot][e][r]), (1, site.b[slot][e][:, r])):
                    off = int(table[slot, (e * 2 + is_b) * site.view.max_rank + r])
                    arena[off : off + 4 * dim] = row.float().contiguous().view(torch.uint8)
    token_slot = torch.tensor([0, 1, -1, 1, 0, 0, 1], dtype=torch.int32)
    topk_ids = torch.tensor([[0], [1], [2], [2], [0], [1], [1]], dtype=torch.int32)
    x = torch.randint(-3, 4, (tokens, dim)).float()
    output = torch.randint(-3, 4, (tokens, dim)).float()
    expected = output.double().clone()
    for t in range(tokens):
        d = site.delta(x[t].double(), int(token_slot[t]), int(topk_ids[t, 0])) if token_slot[t] >= 0 else None
        if d is not None:
            expected[t] += d
    meta = ops.moe_lora_align(topk_ids, token_slot, experts, 2, 2)
    ops.fused_moe_lora(x, output, *meta, 2, [site.view], [0], input_pairs_per_row=1)
    assert torch.equal(output, expected.float())


def _small_problem():
    site = make_lora_site([4, 8], 2, 16, 8, torch.float32, seed=3)
    token_slot = torch.tensor([0, 1, -1], dtype=torch.int32)
    topk_ids = torch.tensor([[0], [1], [1]], dtype=torch.int32)
    meta = ops.moe_lora_align(topk_ids, token_slot, 2, 2, 4)
    x = torch.randn(3, 16)
    output = torch.zeros(3, 8)
    return site, meta, x, output


@pytest.mark.parametrize(
    "mutate,arg",
    [
        (lambda a: a.update(output=torch.zeros(3, 8, dtype=torch.float16)), "output"),
        (lambda a: a.update(input=torch.randn(3, 15)), "in_dim"),
        (lambda a: a.update(col_offsets=[1]), "col_offsets"),
        (lambda a: a.update(col_offsets=[0, 0]), "col_offsets"),
        (lambda a: a.update(block_m=0), "block_m"),
        (lambda a: a.update(topk_weights=torch.ones(2)), "topk_weights"),
        (lambda a: a.update(topk_weights=torch.ones(3, dtype=torch.float64)), "topk_weights"),
        (lambda a: a.update(input_pairs_per_row=2), "output"),
        (lambda a: a.update(input=torch.randn(8, 3).T), "input"),
        (lambda a: a.update(slices=[]), "slices"),
        (lambda a: a.update(num_adapters=-1), "active_slots"),
    ],
)
def test_fused_moe_lora_rejects_bad_arguments(mutate, arg):
    site, (pairs, b_slot, b_expert, n_blocks), x, output = _small_problem()
    args = {
        "input": x, "output": output, "sorted_pairs": pairs, "block_slot": b_slot, "block_expert": b_expert,
        "num_blocks": n_blocks, "block_m": 4, "slices": [site.view], "col_offsets": [0], "input_pairs_per_row": 1,
    }
    mutate(args)
    with pytest.raises(moelora.InvalidArgument, match=arg):
        ops.fused_moe_lora(**args)


def test_fused_moe_lora_rejects_out_of_range_slot_in_metadata():
    site, (pairs, b_slot, b_expert, n_blocks), x, output = _small_problem()
    b_slot[0] = 5
    with pytest.raises(moelora.InvalidArgument, match="block_slot"):
        ops.fused_moe_lora(x, output, pairs, b_slot, b_expert, n_blocks, 4, [site.view], [0],
                           input_pairs_per_row=1)
