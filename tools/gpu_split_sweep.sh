#!/usr/bin/env bash
# Tuning data for the tensor-core LoRA kernel's cluster split and the alignment forms on one
# H200: build, the align / mma GPU tests, tools/align_study.py (one-CTA vs multi-CTA align by
# step size), then the kernel grid (grouped form, no base timing) once with the heuristic split
# and once per forced MOELORA_MMA_SPLIT in SPLITS. Results: $OUT/align.jsonl, $OUT/split.jsonl
# (kernel_version "split-<n>" or "split-auto"). BLOCK_MS="16 32 64": the whole sweep once per
# forced block_m (bench --block-m; versions "bm<m>-split-<n>"); SKIP_ALIGN=1 skips the align study.
source "$(dirname "$0")/gpu_common.sh"
stage build
build_wheel build/gpu
stage pytest
(cd tests/python && timeout 120 python3 -m pytest -q -n 16 -m gpu -p no:cacheprovider -rf \
  --tb=short -k "align or fused_moe_lora" test_gpu_ops.py > "$OUT/pytest.log" 2>&1)
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -12
if [ "${SKIP_ALIGN:-0}" != 1 ]; then
  stage align-study
  timeout 120 python3 tools/align_study.py > "$OUT/align.jsonl" 2> "$OUT/align.log"
  tail -3 "$OUT/align.log"
fi
S="python3 -m moelora.bench.kernels --iters 20 --ranks 16 --popularity uniform --no-base
   --form grouped --tokens ${TOKENS:-128 512 2048 8192} --adapters 4 16 --out $OUT/split.jsonl"
for bm in ${BLOCK_MS:-rule}; do
  tag=""; extra=""
  [ "$bm" != rule ] && tag="bm$bm-" && extra="--block-m $bm"
  stage "${tag}split-auto"
  timeout 120 $S $extra --settle-s 0.3 --version "${tag}split-auto" > /dev/null 2>> "$OUT/split.log"
  for n in ${SPLITS:-1 2 3 4 6 8}; do
    stage "${tag}split-$n"
    MOELORA_MMA_SPLIT=$n timeout 120 $S $extra --settle-s 0.3 --version "${tag}split-$n" \
      > /dev/null 2>> "$OUT/split.log"
  done
done
tail -3 "$OUT/split.log"
stage done
bundle_logs split
