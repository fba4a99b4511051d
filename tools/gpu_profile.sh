#!/usr/bin/env bash
# Hardware counters (Nsight Compute, clocks left alone) for the LoRA kernels of chosen benchmark
# cases, to place time the event timings cannot. Assumes the wheel is installed (run after
# gpu_kernels.sh or gpu_attention.sh in the same call). Cases: PROFILE_CASES, each
# "preset:tokens:adapters" (default: the cases furthest from their targets in bench/NOTES.md).
# One text report per case under $OUT/ncu-<preset>-<tokens>-<adapters>.txt; the summary lines are
# printed. PROFILE_ATTENTION="context:batch:kernel" also profiles one paged-attention launch.
source "$(dirname "$0")/gpu_common.sh"
CASES=${PROFILE_CASES:-"gpt-oss-20b:512:4 mixtral-8x7b:128:4 gpt-oss-20b:8192:16"}
SECTIONS="--section SpeedOfLight --section LaunchStats --section Occupancy \
  --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats"
for case in $CASES; do
  IFS=: read -r preset tokens adapters <<< "$case"
  stage "ncu $case"
  timeout ${NCU_TIMEOUT:-120} ncu --clock-control none -k regex:lora --launch-skip 0 \
    --launch-count 4 $SECTIONS python3 -m moelora.bench.kernels --presets "$preset" \
    --tokens "$tokens" --adapters "$adapters" --ranks 16 --popularity uniform --iters 2 \
    --no-base > "$OUT/ncu-${case//:/-}.txt" 2>&1
  grep -E "lora_|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Grid Size|Cluster Size|Waves Per SM" \
    "$OUT/ncu-${case//:/-}.txt" | head -60
done
if [ -n "${PROFILE_ATTENTION:-}" ]; then  # "context:batch:kernel", e.g. 8192:1:mma
  IFS=: read -r context batch kernel <<< "$PROFILE_ATTENTION"
  stage "ncu attention $PROFILE_ATTENTION"
  timeout ${NCU_TIMEOUT:-120} ncu --clock-control none -k regex:paged_attention --launch-count 1 \
    $SECTIONS --section SourceCounters --section InstructionStats python3 -m moelora.bench.attention \
    --context-lens "$context" --batches "$batch" --kernels "$kernel" --iters 2 \
    > "$OUT/ncu-attention.txt" 2>&1
  grep -E "Duration|DRAM Throughput|Compute \(SM\)|Issue Slots|Warp Cycles Per Issued|Stall|stall|Executed Instructions " \
    "$OUT/ncu-attention.txt" | head -40
fi
stage done
bundle_logs profile
