#!/usr/bin/env bash
# Build variants of the tensor-core LoRA kernel on one H200: VARIANTS of "stages:min_ctas"
# (default "3:- 4:- 3:5"; -DMOELORA_MMA_STAGES / -DMOELORA_MMA_MIN_CTAS, "-" leaves the latter
# unset, as the default build does; see cuda/lora/prefill.cu), one wheel each, each timed on the
# prefill grid (grouped form, no base) into $OUT/stages.jsonl with kernel_version
# "stages-<s>-ctas-<c>"; the kernel's register counts printed. Leaves the last one installed.
source "$(dirname "$0")/gpu_common.sh"
for v in ${VARIANTS:-3:- 4:- 3:5}; do
  IFS=: read -r s c <<< "$v"
  flags="-DMOELORA_MMA_STAGES=$s -Xptxas=-v"
  [ "$c" != "-" ] && flags="$flags -DMOELORA_MMA_MIN_CTAS=$c"
  stage "build stages=$s min_ctas=$c"
  build_wheel "build/gpu-s$s-c$c" -C "cmake.define.CMAKE_CUDA_FLAGS=$flags"
  grep -A3 "Compiling entry.*lora_mma_kernel" "$OUT/build.log" | grep -oE "Used [0-9]+ registers" \
    | sort | uniq -c
  stage "bench stages=$s min_ctas=$c"
  timeout 120 python3 -m moelora.bench.kernels --iters 20 --ranks 16 --popularity uniform \
    --no-base --form grouped --tokens ${TOKENS:-512 2048 8192} --adapters 4 16 \
    --version "stages-$s-ctas-$c" --out "$OUT/stages.jsonl" > /dev/null 2>> "$OUT/stages.log"
done
tail -3 "$OUT/stages.log"
stage done
bundle_logs stages
