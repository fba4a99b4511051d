"""Where one MoE layer's LoRA time goes, per kernel, and whether the benchmark's timing method
holds: the layer (the engine's plan: form, block size, kernels) captured in a graph and timed
with CUDA events after a write flush of L2 (moelora.bench.kernels' method), after a read flush
(L2 evicted, nothing dirty), with a warm L2, and as the profiler's per-kernel durations (CUPTI)
after a write flush, for graph replays and eager calls. GPU only.

    python3 bench/studies/layer_kernels.py --cases gpt-oss-20b:512:4 mixtral-8x7b:128:4
"""

from __future__ import annotations

import argparse
import statistics

import torch
from moelora import ops
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
from torch.profiler import ProfilerActivity, profile


def kernel_times(fn, iters, flush):
    """Median duration (profiler, CUPTI) of each LoRA kernel fn() launches, in launch order,
    over `iters` calls each after a write flush."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and "lora" in e.name),
                    key=lambda e: e.time_range.start)
    per = len(events) // iters
    return [(events[k].name.split("(")[0][-40:],
             round(statistics.median(events[i * per + k].time_range.elapsed_us()
                                     for i in range(iters)), 1)) for k in range(per)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["gpt-oss-20b:512:4", "mixtral-8x7b:128:4",
                                                        "qwen3-30b-a3b:1:4"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--slots", type=int, default=16, help="adapter slots in each arena")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    for case in args.cases:
        preset, tokens, adapters = case.split(":")
        tokens, adapters = int(tokens), int(adapters)
        _, inter, experts, top_k = PRESETS[preset]
        arenas = layer_arenas(preset, args.slots, 16, dtype, device)
        ranks = torch.full((args.slots,), 16, dtype=torch.int32, device=device)
        gen, (ids, weights, x, h, h13, y) = layer_inputs(preset, tokens, dtype, device)
        token_slot = draw_slots(tokens, adapters, "uniform", gen, device)
        plan = ops.plan_lora(tokens * top_k, num_experts=experts, num_adapters=adapters,
                             dtype=dtype, device=device)  # the engine's choices
        form, block_m = plan.form, plan.block_m
        fn = make_lora_delta(ids, token_slot, weights, x, h, h13, y,
                             *layer_views(arenas, ranks), experts, args.slots, inter, plan, form,
                             num_adapters=adapters)
        graph = graph_of(fn)
        write = median_event_us(graph.replay, args.iters, flush)

        class ReadFlush:
            def zero_(self):
                torch.amax(flush)  # reads all of it: L2 evicted, nothing left dirty

        read = median_event_us(graph.replay, args.iters, ReadFlush())
        warm = median_event_us(graph.replay, args.iters, None)
        print(f"{case} {form} block_m={block_m}: events write-flush {write:.1f} read-flush "
              f"{read:.1f} warm {warm:.1f}\n"
              f"  graph kernels {kernel_times(graph.replay, args.iters, flush)}\n"
              f"  eager kernels {kernel_times(fn, args.iters, flush)}", flush=True)


if __name__ == "__main__":
    main()
