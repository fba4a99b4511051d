"""moe_lora_align alone on the GPU: the one-CTA form against the multi-CTA form over a range of
step sizes, each captured in a CUDA graph and timed with CUDA events (median; L2 flushed before
each replay), plus the eager call with a host clock. One JSON line per (pairs, form). Answers
where the plan should switch align kernels (kMultiCtaMinPairs, src/plan.cpp). GPU only.

    python3 bench/studies/align_forms.py --tokens 16 64 128 256 512 1024 2048 8192 \
        --experts 128 --top-k 8
"""

from __future__ import annotations

import argparse
import json

import torch
from moelora import ops
from moelora.bench.kernels import graph_of, median_event_us, median_host_us


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+",
                        default=[16, 64, 128, 256, 512, 1024, 2048, 8192])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--adapters", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--block-m", type=int, default=16)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for adapters in args.adapters:
        for tokens in args.tokens:
            pairs = tokens * args.top_k
            ids = torch.randint(0, args.experts, (tokens, args.top_k), generator=gen,
                                device=device, dtype=torch.int32)
            slots = torch.randint(0, adapters, (tokens,), generator=gen, device=device,
                                  dtype=torch.int32)
            results = {}
            for form in ("single", "multi"):
                plan = ops.plan_lora(pairs, num_experts=args.experts, device=device,
                                     overrides=ops.PlanOverrides(align_kernel=form))

                def call(ids=ids, slots=slots, plan=plan):
                    return ops.moe_lora_align(ids, slots, args.experts, 16, args.block_m,
                                              plan=plan)

                results[form] = [r.cpu() for r in call()]
                graph = graph_of(call)
                graph_us = median_event_us(graph.replay, args.iters, flush)
                host_us = median_host_us(call, args.iters)
                print(json.dumps({"bench": "align", "tokens": tokens, "pairs": pairs,
                                  "experts": args.experts, "adapters": adapters, "form": form,
                                  "device": torch.cuda.get_device_name(),
                                  "graph_us": round(graph_us, 2), "host_us": round(host_us, 2)}),
                      flush=True)
            # same blocks: compare the per-block pair sets (order within a group may differ)
            assert int(results["single"][3]) == int(results["multi"][3]), "num_blocks differ"


if __name__ == "__main__":
    main()
