"""dense_lora (attention projections) on the CPU against a float64 torch reference."""

from __future__ import annotations

import moelora
import pytest
import torch
from lora_fixtures import POPULARITIES, assign_slots, make_lora_site
from moelora import ops

TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}
SLOT_RANKS = [16, 0, 4, 64, 8]


def run_case(tokens, hidden, popularity, block_m, dtype, strided):
    seed = tokens * 31 + hidden + block_m
    gen = torch.Generator().manual_seed(seed)
    token_slot = assign_slots(tokens, SLOT_RANKS, popularity, seed)
    # q/k/v-like slices of different widths, packed with a gap of 2 columns between k and v
    out_dims, col_offsets = [hidden, 24, 24], [0, hidden, hidden + 26]
    width = hidden + 50
    sites = [
        make_lora_site(SLOT_RANKS, 1, hidden, d, dtype, seed + i) for i, d in enumerate(out_dims)
    ]
    pad = 7 if strided else 0
    x_full = torch.randn(tokens, hidden + pad, generator=gen, dtype=torch.float64).to(dtype)
    x = x_full[:, :hidden]
    delta = torch.zeros(tokens, width, dtype=torch.float64)
    written = torch.zeros(tokens, width, dtype=torch.bool)
    for t in range(tokens):
        slot = int(token_slot[t])
        if slot < 0:
            continue
        for site, col in zip(sites, col_offsets):
            d = site.delta(x[t].double(), slot, 0)
            if d is not None:
                delta[t, col : col + site.out_dim] = d
                written[t, col : col + site.out_dim] = True
    base = torch.randn(tokens, width + pad, generator=gen, dtype=torch.float64)
    base[:, :width][~written] = float("nan")
    base[:, width:] = float("nan")
    out_full = base.to(dtype)
    output = out_full[:, :width]
    expected = (output.double() + delta).to(dtype)

    sorted_rows, block_slot, _, num_blocks = ops.moe_lora_align(
        None, token_slot, 1, len(SLOT_RANKS), block_m
    )
    ops.dense_lora(x, output, sorted_rows, block_slot, num_blocks, block_m,
                   [s.view for s in sites], col_offsets)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(output[written].double(), expected[written].double(), rtol=rtol, atol=atol)
    assert torch.isnan(output[~written]).all()
    assert torch.isnan(out_full[:, width:]).all()


@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize(
    "tokens,hidden,block_m,dtype,strided",
    [
        (1, 111, 1, torch.float32, False),
        (7, 64, 4, torch.float16, True),
        (133, 111, 16, torch.bfloat16, True),
    ],
)
def test_dense_lora_matches_reference(tokens, hidden, popularity, block_m, dtype, strided):
    run_case(tokens, hidden, popularity, block_m, dtype, strided)


def test_dense_lora_rejects_mismatched_rows():
    site = make_lora_site([4], 1, 16, 8, torch.float32, seed=1)
    token_slot = torch.zeros(3, dtype=torch.int32)
    rows, b_slot, _, n = ops.moe_lora_align(None, token_slot, 1, 1, 4)
    with pytest.raises(moelora.InvalidArgument, match="output"):
        ops.dense_lora(torch.randn(3, 16), torch.zeros(4, 8), rows, b_slot, n, 4, [site.view], [0])
    with pytest.raises(moelora.InvalidArgument, match="sorted_rows"):
        ops.dense_lora(torch.randn(3, 16), torch.zeros(3, 8), rows[:-1], b_slot, n, 4,
                       [site.view], [0])
    with pytest.raises(moelora.InvalidArgument, match="col_offsets"):
        ops.dense_lora(torch.randn(3, 16), torch.zeros(3, 8), rows, b_slot, n, 4, [site.view], [4])
