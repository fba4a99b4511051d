"""One dense site's LoRA delta (an attention projection) in both forms on the GPU: unsorted
(fused_moe_lora_unsorted, one cluster per row, no alignment) and grouped (dense_lora over rows
grouped by adapter), per row count and adapter count. Answers where the plan should switch dense
sites to the grouped form (kUnsortedMaxDenseRows, src/plan.cpp). The grouping (moe_lora_align)
runs once per step for every dense site of every layer, so it is timed apart. Graph replay, L2
flushed, median; one line each, JSON lines appended to --out. GPU only.

    python3 bench/studies/dense_forms.py --out dense-forms.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch
from moelora import ops
from moelora.bench.kernels import SiteArena, draw_slots, graph_of, median_event_us

# (name, in_dim, out_dim) of common projections
SITES = {
    "qwen3-q": (2048, 4096),    # qwen3-30b-a3b q_proj (32 heads x 128)
    "qwen3-o": (4096, 2048),    # qwen3-30b-a3b o_proj
    "mixtral-q": (4096, 4096),  # mixtral / llama-7b q_proj
    "mixtral-k": (4096, 1024),  # mixtral k_proj (8 KV heads x 128)
}
SLOTS = 16


def time_site(site, rows, adapters, rank, iters, flush, dtype, device):
    in_dim, out_dim = SITES[site]
    plan = ops.plan_lora(rows, dense=True, num_adapters=adapters, dtype=dtype, device=device)
    block_m = plan.block_m
    gen = torch.Generator(device=device).manual_seed(rows * 100 + adapters)
    arena = SiteArena(SLOTS, 1, rank, in_dim, out_dim, dtype, device)
    view = arena.view(torch.full((SLOTS,), rank, dtype=torch.int32, device=device))
    x = torch.randn(rows, in_dim, generator=gen, device=device).to(dtype)
    out = torch.randn(rows, out_dim, generator=gen, device=device).to(dtype)
    token_slot = draw_slots(rows, adapters, "uniform", gen, device)
    groups = ops.moe_lora_align(None, token_slot, 1, SLOTS, block_m, plan=plan)
    sorted_rows, block_slot, _, num_blocks = groups

    def unsorted():
        ops.fused_moe_lora_unsorted(x, out, None, token_slot, [view], [0], input_pairs_per_row=1,
                                    plan=plan)

    def grouped():
        ops.dense_lora(x, out, sorted_rows, block_slot, num_blocks, block_m, [view], [0],
                       plan=plan)

    def align():
        ops.moe_lora_align(None, token_slot, 1, SLOTS, block_m, plan=plan)

    times = {"plan": plan.form, "block_m": block_m}
    for name, fn in (("unsorted", unsorted), ("grouped", grouped), ("align", align)):
        graph = graph_of(fn)
        times[name] = median_event_us(graph.replay, iters, flush)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", nargs="+", default=list(SITES), choices=list(SITES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--adapters", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dense_form_study needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    print(f"{'site':10} {'rows':>5} {'adapters':>8} {'unsorted':>9} {'grouped':>9} {'align':>7} "
          f"{'plan':>9} (us; plan: the form the engine takes)")
    for site in args.sites:
        for adapters in args.adapters:
            for rows in args.rows:
                t = time_site(site, rows, adapters, args.rank, args.iters, flush, dtype, device)
                print(f"{site:10} {rows:5d} {adapters:8d} {t['unsorted']:9.1f} "
                      f"{t['grouped']:9.1f} {t['align']:7.1f} {t['plan']:>9}", flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({"site": site, "rows": rows, "adapters": adapters,
                                            "rank": args.rank, "dtype": "bfloat16",
                                            "device": torch.cuda.get_device_name(),
                                            "block_m": t["block_m"], "plan": t["plan"],
                                            "unsorted_us": t["unsorted"],
                                            "grouped_us": t["grouped"],
                                            "align_us": t["align"]}) + "\n")


if __name__ == "__main__":
    main()
