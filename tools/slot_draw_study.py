"""Which property of a step's token -> adapter map changes the decode layer's time. GPU only.

The kernel grid (`moelora bench kernels`) draws the 4-adapter slots and then the 16-adapter slots
of a token count from one generator; session 8 found its 8-token, 16-adapter cases ~12 us slower
than a fresh 16-adapter draw. This times one layer's unsorted LoRA delta (graph replay, L2
flushed) for the grid's two draws, a fresh draw, and variants of the slow one (base tokens
removed, slots relabelled 0.., slots shifted, outputs refreshed), printing each map's base
tokens, (slot, expert) groups and the time. What it showed (bench/NOTES.md, "v3h"): only the
number of valid pairs mattered, through the decode kernel's launch plan.

    python3 tools/slot_draw_study.py --presets qwen3-30b-a3b mixtral-8x7b --tokens 8
"""

from __future__ import annotations

import argparse

import torch
from moelora.bench.kernels import (
    PRESETS,
    draw_slots,
    graph_of,
    layer_arenas,
    layer_inputs,
    layer_views,
    make_lora_delta,
    median_event_us,
)

SLOTS = 16  # arena slots, as the grid's 4 / 16-adapter runs use


def relabelled(slots):
    """The same map with adapters renamed 0, 1, ... in order of first use (-1 kept)."""
    names = {}
    return torch.tensor([-1 if s < 0 else names.setdefault(s, len(names)) for s in slots.tolist()],
                        dtype=slots.dtype, device=slots.device)


def variants(preset, tokens, dtype, device):
    gen, _ = layer_inputs(preset, tokens, dtype, device)
    first4 = draw_slots(tokens, 4, "uniform", gen, device)
    second16 = draw_slots(tokens, 16, "uniform", gen, device)
    fresh, _ = layer_inputs(preset, tokens, dtype, device)
    return {
        "grid 4 adapters": first4,
        "grid 16 adapters": second16,
        "fresh 16 adapters": draw_slots(tokens, 16, "uniform", fresh, device),
        "grid 16, no base": torch.where(second16 < 0, torch.zeros_like(second16), second16),
        "grid 16, relabelled": relabelled(second16),
        "grid 16, shifted by 8": torch.where(second16 < 0, second16, (second16 + 8) % SLOTS),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    for preset in args.presets:
        _, inter, experts, top_k = PRESETS[preset]
        arenas = layer_arenas(preset, SLOTS, 16, dtype, device)
        ranks = torch.full((SLOTS,), 16, dtype=torch.int32, device=device)
        views13, views2 = layer_views(arenas, ranks)
        _, (ids, weights, x, h, h13, y) = layer_inputs(preset, args.tokens, dtype, device)
        for name, slots in variants(preset, args.tokens, dtype, device).items():
            h13.normal_()  # outputs accumulate over replays; start every variant afresh
            y.normal_()
            delta = make_lora_delta(ids, slots, weights, x, h, h13, y, views13, views2, experts,
                                    SLOTS, 16, inter, "unsorted")
            us = median_event_us(graph_of(delta).replay, args.iters, flush)
            pair_slot = slots.long().repeat_interleave(top_k)
            valid = pair_slot >= 0
            groups = torch.unique(pair_slot[valid] * experts + ids.reshape(-1).long()[valid])
            print(f"{preset} {name:22s} {us:6.1f} us  slots {slots.tolist()}  valid pairs "
                  f"{int(valid.sum())}  groups {groups.numel()}", flush=True)


if __name__ == "__main__":
    main()
