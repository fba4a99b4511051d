"""How the tensor-core LoRA kernel's cluster-split rule (cluster_split in cuda/lora/prefill.cu) was
fitted: reads a forced-split sweep (tools/gpu_split_sweep.sh: the kernel grid once per
MOELORA_MMA_SPLIT and once with the heuristic; with BLOCK_MS, once per block_m, of which the
block_m that ops.grouped_block_m picks is scored), models the rule on the host (expected blocks as
in expected_blocks of cuda/lora/dispatch.cu), and scores candidate targets by the geometric mean
and worst ratio of the time at the rule's split over the case's best forced split. Also a
leave-one-preset-out check. No GPU needed.

    python3 tools/fit_mma_split.py bench/results/h200-mma-v3f-blockm-split-sweep.jsonl
    python3 tools/fit_mma_split.py bench/results/h200-mma-split-sweep.jsonl  # session 5, v3c
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import defaultdict

from moelora import ops
from moelora.bench.kernels import PRESETS

SM_COUNT = 132  # H200


def load_cases(path):
    times = defaultdict(dict)
    recorded_block_m = {}  # the block_m each case ran at without a forced --block-m
    with open(path) as lines:
        for line in lines:
            r = json.loads(line)
            case = (r["preset"], r["tokens"], r["adapters"])
            times[case][r["kernel_version"]] = r["lora_us"]
            if not r["kernel_version"].startswith("bm"):
                recorded_block_m[case] = r["block_m"]
    cases = []
    for (preset, tokens, adapters), by_version in times.items():
        _, _, experts, top_k = PRESETS[preset]
        pairs, groups = tokens * top_k, adapters * experts
        if pairs < ops.GROUPED_FROM_PAIRS:  # below the tensor-core kernel (kMmaMinPairs)
            continue
        # A block_m sweep is scored at the block_m today's rule picks; an older sweep at the
        # block_m it ran at (session 5's was measured under a threshold of 4 pairs a group).
        if any(v.startswith("bm") for v in by_version):
            block_m = ops.grouped_block_m(pairs, experts, adapters)
            tag = f"bm{block_m}-split-"
        else:
            block_m = recorded_block_m[(preset, tokens, adapters)]
            tag = "split-"
        bound = (pairs + min(pairs, groups) * (block_m - 1)) // block_m
        expected = min(bound, groups * -math.expm1(-pairs / groups) + pairs / block_m)
        forced = {int(v.removeprefix(tag)): t for v, t in by_version.items()
                  if v.startswith(tag) and v != tag + "auto"}
        cases.append({"case": (preset, tokens, adapters), "warps": min(4, (block_m + 15) // 16),
                      "expected": expected, "forced": forced, "auto": by_version.get(tag + "auto")})
    return cases


def rule(ctas_per_sm, choices):
    def split_of(case):
        wanted = ctas_per_sm[case["warps"]] * SM_COUNT / case["expected"]
        return min((c for c in choices if c in case["forced"]),
                   key=lambda c: (abs(math.log(c / wanted)), c))  # nearest by ratio
    return split_of


def score(cases, split_of):
    ratios = [c["forced"][split_of(c)] / min(c["forced"].values()) for c in cases]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)), max(ratios)


def best_rule(cases):
    grid = itertools.product([4, 6, 8, 10, 12], [2, 3, 4, 5, 6],
                             [(1, 2, 3, 4, 6, 8), (1, 2, 3, 6, 8), (1, 2, 3)])
    return min(((score(cases, rule({1: one, 4: four}, choices)), one, four, choices)
                for one, four, choices in grid))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep")
    args = parser.parse_args()
    cases = load_cases(args.sweep)
    auto = [c for c in cases if c["auto"]]
    gm = math.exp(sum(math.log(c["auto"] / min(c["forced"].values())) for c in auto) / len(auto))
    print(f"heuristic of the sweep's build: geometric mean {gm:.3f} x the best forced split")
    (g, worst), one, four, choices = best_rule(cases)
    print(f"best: {one} CTAs/SM (1 warp), {four} (4 warps), splits {choices}: "
          f"geometric mean {g:.3f}, worst {worst:.2f}")
    for preset in PRESETS:
        train = [c for c in cases if c["case"][0] != preset]
        test = [c for c in cases if c["case"][0] == preset]
        _, one, four, choices = best_rule(train)
        print(f"  fitted without {preset}: {one}/{four} {choices}, on {preset}: "
              f"{score(test, rule({1: one, 4: four}, choices))[0]:.3f}")


if __name__ == "__main__":
    main()
