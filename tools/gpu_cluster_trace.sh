#!/usr/bin/env bash
# Where a decode launch's time goes, on one GPU: builds a diagnostic wheel with
# -DMOELORA_CLUSTER_TRACE (lora/decode.cu's PhaseTrace: the first and the last CTA of each
# decode-kernel launch stamp the global timer at each phase and print the stamps), times the
# decode grid's smallest steps with it (graph replays, L2 flushed, as bench kernels does), and
# prints the median of each phase per launch kind (w13: 2 slices, w2: 1). Only the in-kernel
# phases mean anything: the printf at a launch's exit delays the launch after it (the graph's
# time, lora_us, reads ~115 us). Leaves the diagnostic wheel installed: run it last in a device
# call, or rebuild after it.
# TRACE_PRESETS, TRACE_TOKENS, TRACE_ADAPTERS: the cases (defaults below).
source "$(dirname "$0")/gpu_common.sh"
stage "build (diagnostic: MOELORA_CLUSTER_TRACE)"
build_wheel build/gpu-trace -C cmake.define.CMAKE_CUDA_FLAGS=-DMOELORA_CLUSTER_TRACE
for preset in ${TRACE_PRESETS:-gpt-oss-20b qwen3-30b-a3b mixtral-8x7b}; do
  for tokens in ${TRACE_TOKENS:-1 8}; do
    stage "trace $preset $tokens"
    timeout 120 python3 -m moelora.bench.kernels --iters 20 --ranks 16 --popularity uniform \
      --no-base --form unsorted --settle-s 0.2 --presets "$preset" --tokens "$tokens" \
      --adapters ${TRACE_ADAPTERS:-4} --version trace > "$OUT/trace-$preset-$tokens.txt" 2>&1
    python3 - "$OUT/trace-$preset-$tokens.txt" <<'PY'
import re, statistics, sys
names = ["wait", "trip1", "trip2", "shrink", "csync", "reduce", "expand"]
lines = [l for l in open(sys.argv[1]) if l.startswith("cluster-trace")]
recs = []
for l in lines:
    f = dict(kv.split("=", 1) for kv in l.split()[1:])
    phases = list(map(int, f["phases"].split(",")))
    recs.append((int(f["slices"]), f["cta"], phases, f["grid"]))
result = [l for l in open(sys.argv[1]) if l.startswith("{")]
if result:
    print("  lora_us", re.search(r'"lora_us": ([0-9.]+)', result[-1]).group(1))
# The timed replays are the last ones: keep the last 20 launches of each kind.
for kind, label in ((2, "w13"), (1, "w2")):
    for cta in ("first", "last"):
        rows = [r for r in recs if r[0] == kind and r[1] == cta][-20:]
        if not rows:
            continue
        med = [statistics.median(r[2][i] for r in rows) for i in range(len(names))]
        print(f"  {label} {cta:5s} grid {rows[-1][3]:10s}",
              " ".join(f"{n} {m / 1000:.2f}" for n, m in zip(names, med)),
              f"total {sum(med) / 1000:.2f} us")
PY
  done
done
stage done
