"""Where the time of one MoE layer's LoRA delta goes at decode: per-kernel GPU times from the
torch profiler (CUPTI) over graph replays, for one preset and token count. GPU only.

    python3 tools/profile_lora_decode.py --preset qwen3-30b-a3b --tokens 1 --adapters 4
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
    make_lora_delta,
)
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-30b-a3b", choices=list(PRESETS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--replays", type=int, default=20)
    args = parser.parse_args()
    _, inter, experts, _ = PRESETS[args.preset]
    device, dtype = torch.device("cuda"), torch.bfloat16
    gate, up, down = layer_arenas(args.preset, args.adapters, args.rank, dtype, device)
    ranks = torch.full((args.adapters,), args.rank, dtype=torch.int32, device=device)
    for tokens in args.tokens:
        gen, (ids, weights, x, h, h13, y) = layer_inputs(args.preset, tokens, dtype, device)
        token_slot = draw_slots(tokens, args.adapters, "uniform", gen, device)
        fn = make_lora_delta(ids, token_slot, weights, x, h, h13, y,
                             [gate.view(ranks), up.view(ranks)], [down.view(ranks)], experts,
                             args.adapters, 16, inter)
        graph = graph_of(fn)
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(args.replays):
                graph.replay()
            torch.cuda.synchronize()
        print(f"== {args.preset} tokens={tokens} adapters={args.adapters} rank={args.rank}: "
              f"graph replays x{args.replays}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=60))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.replays):
            graph.replay()
        end.record()
        end.synchronize()
        print(f"back-to-back replay (warm L2): {start.elapsed_time(end) * 1e3 / args.replays:.1f} "
              f"us per layer")


if __name__ == "__main__":
    main()
