"""Where a decode launch's time goes: the median of each phase of the decode LoRA kernel (wait
for the grid ahead, trip 1, trip 2, shrink, cluster sync, reduce, expand), per launch kind (w13:
2 slices, w2: 1) and CTA (the grid's first and last), from the stamps a trace build prints.

A trace build is a diagnostic only (the MOELORA_KERNEL_TRACE CMake option, off everywhere
else); its printf at a launch's exit delays the launch after it, so only the in-kernel phases
mean anything. On a GPU machine:

    pip install --no-build-isolation --no-deps . -C build-dir=build/trace \\
        -C cmake.define.MOELORA_KERNEL_TRACE=ON
    python3 -m moelora.bench.kernels --iters 20 --ranks 16 --popularity uniform --no-base \\
        --form unsorted --presets qwen3-30b-a3b --tokens 1 --adapters 4 > trace.txt 2>&1
    python3 bench/studies/decode_trace.py trace.txt

Reinstall a normal build afterwards.
"""

from __future__ import annotations

import argparse
import statistics

PHASES = ["wait", "trip1", "trip2", "shrink", "csync", "reduce", "expand"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("log", help="output of a benchmark run on a trace build")
    parser.add_argument("--last", type=int, default=20,
                        help="launches of each kind to keep (the timed replays are the last)")
    args = parser.parse_args()
    with open(args.log) as log:
        lines = [line for line in log if line.startswith("cluster-trace")]
    records = []
    for line in lines:
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        phases = [int(p) for p in fields["phases"].split(",")]
        records.append((int(fields["slices"]), fields["cta"], phases, fields["grid"]))
    if not records:
        raise SystemExit(f"no cluster-trace lines in {args.log}: was it a trace build?")
    for slices, label in ((2, "w13"), (1, "w2")):
        for cta in ("first", "last"):
            rows = [r for r in records if r[0] == slices and r[1] == cta][-args.last:]
            if not rows:
                continue
            med = [statistics.median(r[2][i] for r in rows) for i in range(len(PHASES))]
            print(f"{label} {cta:5s} grid {rows[-1][3]:10s}",
                  " ".join(f"{n} {m / 1000:.2f}" for n, m in zip(PHASES, med)),
                  f"total {sum(med) / 1000:.2f} us")


if __name__ == "__main__":
    main()
