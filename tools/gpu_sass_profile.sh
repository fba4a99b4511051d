#!/usr/bin/env bash
# Where a LoRA kernel spends its issue slots, per SASS instruction: builds the wheel with
# -lineinfo, profiles the first LAUNCHES (default 2: w13 then w2) launches of SASS_KERNEL (a name
# regex, default lora_mma: the tensor-core kernel; lora_cluster with SASS_FORM=unsorted: the
# decode kernel) in each case of SASS_CASES ("preset:tokens:adapters", benchmark form SASS_FORM,
# default grouped) with Nsight Compute's source counters, and exports the per-instruction page
# (executed instructions, warp stall samples, source line) as CSV: $OUT/sass-<case>.csv. Also
# prints the stall breakdown and instruction mix.
source "$(dirname "$0")/gpu_common.sh"
CASES=${SASS_CASES:-"qwen3-30b-a3b:8192:4 qwen3-30b-a3b:2048:16"}
stage build
build_wheel build/gpu-lineinfo -C "cmake.define.CMAKE_CUDA_FLAGS=-lineinfo"
for case in $CASES; do
  IFS=: read -r preset tokens adapters <<< "$case"
  name=${case//:/-}
  stage "ncu $case"
  timeout ${NCU_TIMEOUT:-150} ncu --clock-control none -k regex:${SASS_KERNEL:-lora_mma} --launch-count \
    ${LAUNCHES:-2} --section SpeedOfLight --section Occupancy --section WarpStateStats \
    --section InstructionStats --section SourceCounters --import-source yes -o "$OUT/rep-$name" \
    python3 -m moelora.bench.kernels --presets "$preset" --tokens "$tokens" \
    --adapters "$adapters" --ranks 16 --popularity uniform --iters 2 --no-base --form ${SASS_FORM:-grouped} \
    > "$OUT/ncu-$name.txt" 2>&1
  ncu -i "$OUT/rep-$name.ncu-rep" --page details > "$OUT/details-$name.txt" 2>&1
  grep -E "Duration|DRAM Throughput|Registers|Achieved Occupancy|Issue Slots|Executed Ipc|Stall|Warp Cycles" \
    "$OUT/details-$name.txt" | head -40
  ncu -i "$OUT/rep-$name.ncu-rep" --page source --csv --print-source sass,cuda \
    > "$OUT/sass-$name.csv" 2> "$OUT/sass-$name.err.txt"
  wc -c "$OUT/sass-$name.csv"; head -3 "$OUT/sass-$name.csv" | cut -c1-400; head -c 600 "$OUT/sass-$name.err.txt"
  gzip -f "$OUT/sass-$name.csv"; rm -f "$OUT/rep-$name.ncu-rep"
done
stage done
bundle_logs sass
