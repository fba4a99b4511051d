"""Where the time of one MoE layer's LoRA delta goes: per-kernel GPU times from the torch profiler
(CUPTI) over graph replays, for one preset at several token counts, with the benchmark's choices
(form: ops.prefer_unsorted; block_m: ops.grouped_block_m; slots: the grid's 16) and, with
--flush (the default), L2 flushed by a 256 MB memset before each replay as the benchmark does.
Prints the kernel table, the sum of the LoRA kernels per layer and the graph time from CUDA
events, so the gap between them (launch latency, idle SMs between kernels) shows. GPU only.

    python3 tools/profile_lora_layer.py --preset gpt-oss-20b --tokens 1 2048 --adapters 4
"""

from __future__ import annotations

import argparse

import torch
from moelora import ops
from moelora.bench.kernels import (
    PRESETS,
    draw_slots,
    graph_of,
    layer_arenas,
    layer_inputs,
    make_lora_delta,
    median_event_us,
)
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-30b-a3b", choices=list(PRESETS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--slots", type=int, default=16, help="adapter slots of the views (the grid: 16)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--no-flush", action="store_true", help="back-to-back replays, warm L2")
    args = parser.parse_args()
    _, inter, experts, top_k = PRESETS[args.preset]
    device, dtype = torch.device("cuda"), torch.bfloat16
    gate, up, down = layer_arenas(args.preset, args.slots, args.rank, dtype, device)
    ranks = torch.full((args.slots,), args.rank, dtype=torch.int32, device=device)
    flush = None if args.no_flush else torch.empty(256 << 20, dtype=torch.uint8, device=device)
    for tokens in args.tokens:
        gen, (ids, weights, x, h, h13, y) = layer_inputs(args.preset, tokens, dtype, device)
        token_slot = draw_slots(tokens, args.adapters, "uniform", gen, device)
        used = len({s for s in token_slot.tolist() if s >= 0})
        pairs = tokens * top_k
        form = ("unsorted" if ops.prefer_unsorted(pairs, num_experts=experts, num_adapters=used)
                else "grouped")
        block_m = ops.grouped_block_m(pairs, experts, used)
        fn = make_lora_delta(ids, token_slot, weights, x, h, h13, y,
                             [gate.view(ranks), up.view(ranks)], [down.view(ranks)], experts,
                             args.slots, block_m, inter, form, num_adapters=used)
        graph = graph_of(fn)
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.replays):
                if flush is not None:
                    flush.zero_()
                graph.replay()
            torch.cuda.synchronize()
        print(f"== {args.preset} tokens={tokens} adapters={args.adapters} rank={args.rank} "
              f"form={form} block_m={block_m}: graph replays x{args.replays}, "
              f"L2 {'warm' if flush is None else 'flushed'}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=60))
        kernel_us = sum(e.device_time_total for e in prof.key_averages()
                        if not e.key.startswith(("Memset", "Memcpy", "void at::"))
                        and "fill" not in e.key and "zero" not in e.key) / args.replays
        graph_us = median_event_us(graph.replay, args.replays, flush)
        print(f"LoRA kernels per layer (sum): {kernel_us:.1f} us; graph (events, median): "
              f"{graph_us:.1f} us")


if __name__ == "__main__":
    main()
