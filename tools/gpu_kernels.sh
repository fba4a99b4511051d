#!/usr/bin/env bash
# Kernel iteration on one H200: build the CUDA wheel, run ctest, the GPU tests of the LoRA kernel
# families (tests/python/test_gpu_lora_forms.py, and test_gpu_ops.py with the tensor-core family
# forced), compute-sanitizer memcheck + racecheck on a slice of them, then the kernel benchmark:
# decode shapes timing both forms (grouped vs unsorted), prefill shapes with the default
# dispatch; then the offline engine benchmark with eager and CUDA-graph decode steps, and with
# 2048-token prompts through SDPA and the paged kernel. ATTENTION_TESTS=1 adds the attention
# kernels' GPU tests (tools/gpu_attention.sh has their benchmark). Logs and JSON lines under $OUT.
source "$(dirname "$0")/gpu_common.sh"

stage build
build_wheel build/gpu -C cmake.define.MOELORA_BUILD_TESTS=ON -C cmake.define.MOELORA_BUILD_BENCH=ON
stage ctest
timeout 120 ctest --test-dir build/gpu --output-on-failure -j8 > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
# a failing native test prints its failed checks here (tests.log may not come back)
grep -E "ERROR:|CHECK|REQUIRE|what\(\)" "$OUT/tests.log" | head -20

pytest_stage pytest-forms ${FORMS_TIMEOUT:-200} test_gpu_lora_forms.py test_decode_graphs.py \
  test_engine_bf16.py test_gpu_dependent_launch.py
# the tensor-core family forced, each block shared by a cluster of 3 CTAs (K and columns split)
MOELORA_LORA_KERNEL=mma MOELORA_MMA_SPLIT=3 pytest_stage pytest-mma ${MMA_TIMEOUT:-120} \
  -k "fused_moe_lora or dense_lora" test_gpu_ops.py

# the multi-CTA alignment forced (the default takes it from 4096 pairs): its tests, then the
# prefill grid with the one-CTA form forced below, as the baseline of the default
MOELORA_ALIGN_KERNEL=multi pytest_stage pytest-align-multi 60 -k "align or fused_moe_lora_mma" \
  test_gpu_ops.py

B="python3 -m moelora.bench.kernels --iters 20 --adapters 4 16 --ranks 16 --popularity uniform --version ${VERSION:-v3j}"
stage bench-decode
timeout ${DECODE_TIMEOUT:-110} $B --tokens 1 8 32 128 --form both --out $OUT/h200-kernels.jsonl \
  >> "$OUT/bench.log" 2>&1
cut -c1-200 "$OUT/bench.log" | tail -3
stage bench-prefill
timeout ${PREFILL_TIMEOUT:-90} $B --tokens 512 2048 8192 --adapters 4 16 \
  --presets gpt-oss-20b qwen3-30b-a3b mixtral-8x7b --out $OUT/h200-kernels.jsonl >> "$OUT/bench.log" 2>&1
cut -c1-200 "$OUT/bench.log" | tail -2
stage bench-prefill-align-single
MOELORA_ALIGN_KERNEL=single timeout ${PREFILL_TIMEOUT:-90} $B --tokens 2048 8192 --adapters 4 16 \
  --presets gpt-oss-20b qwen3-30b-a3b --no-base --version ${VERSION:-v3j}-align-single \
  --out $OUT/h200-kernels-align-single.jsonl >> "$OUT/bench.log" 2>&1
cut -c1-200 "$OUT/bench.log" | tail -2
stage bench-offline  # eager vs CUDA-graph decode steps, same workload
O="python3 -m moelora.bench.offline --model synthetic:qwen3-30b-a3b --num-layers 8 --num-adapters 8
   --max-loras 8 --num-prompts 64 --input-len 128 --output-len 64 --device cuda --dtype bfloat16
   --adapter-dir /tmp/moelora-offline-adapters --out $OUT/offline.jsonl"
timeout ${OFFLINE_TIMEOUT:-120} $O --enforce-eager >> "$OUT/bench.log" 2>&1
timeout ${OFFLINE_TIMEOUT:-120} $O >> "$OUT/bench.log" 2>&1
# long prompts: fresh prefills through SDPA vs every token on the paged kernel (the CUDA default)
L="python3 -m moelora.bench.offline --model synthetic:qwen3-30b-a3b --num-layers 8 --num-adapters 8
   --max-loras 8 --num-prompts 16 --input-len 2048 --output-len 16 --device cuda --dtype bfloat16
   --adapter-dir /tmp/moelora-offline-adapters --out $OUT/offline-long.jsonl"
MOELORA_PREFILL_ATTENTION=sdpa timeout ${OFFLINE_TIMEOUT:-120} $L >> "$OUT/bench.log" 2>&1
MOELORA_PREFILL_ATTENTION=paged timeout ${OFFLINE_TIMEOUT:-120} $L >> "$OUT/bench.log" 2>&1
python3 - "$OUT/offline-long.jsonl" <<'PY'
import json, sys
for name, r in zip(["sdpa ", "paged"], map(json.loads, open(sys.argv[1]))):
    print(name, "TTFT p50 ms with", round(r["with_adapters"]["ttft_p50_ms"]), "warm",
          round(r["with_adapters_warm"]["ttft_p50_ms"]), "without",
          round(r["no_adapters"]["ttft_p50_ms"]))
PY
python3 - "$OUT/offline.jsonl" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print("graphs" if r["decode_graphs"] else "eager ", "replays", r["decode_graph_replays"],
          "tok/s with", round(r["with_adapters"]["output_tokens_per_s"]), "warm",
          round(r["with_adapters_warm"]["output_tokens_per_s"]), "without",
          round(r["no_adapters"]["output_tokens_per_s"]), "TPOT p50",
          round(r["with_adapters_warm"]["tpot_p50_ms"], 2), "ms (warm)")
PY
# compute-sanitizer on a small slice of the kernel tests (every family, one process).
sanitize() {
  local tool=$1
  shift
  stage "sanitize-$tool"
  (cd tests/python && timeout ${SANITIZE_TIMEOUT:-90} compute-sanitizer --tool "$tool" \
    --error-exitcode 9 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short "$@") \
    > "$OUT/sanitize-$tool.log" 2>&1
  echo "exit $?" >> "$OUT/sanitize-$tool.log"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid|passed|failed|^exit" \
    "$OUT/sanitize-$tool.log" | tail -6
  cat "$OUT/sanitize-$tool.log" >> "$OUT/tests.log"; rm "$OUT/sanitize-$tool.log"
}
if [ "${SANITIZE:-1}" != 1 ]; then
  echo "compute-sanitizer skipped (SANITIZE=0)"
elif command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    MOELORA_MMA_SPLIT=2 sanitize $tool test_gpu_lora_forms.py -k "7-888 or 133-111"
    MOELORA_LORA_KERNEL=mma MOELORA_MMA_SPLIT=2 sanitize $tool test_gpu_ops.py \
      -k "fused_moe_lora_matches and 133-888"
    sanitize $tool test_gpu_ops.py -k "align_matches and multi and 2100"  # the cooperative align
    # kernels chained through memory with programmatic dependent launch (cuda/common/launch.cuh)
    sanitize $tool test_gpu_dependent_launch.py -k "unsorted-auto-7-888 or mma-133-888-64"
    sanitize $tool test_gpu_lora_forms.py -k "wide_clusters and 7-"  # clusters of 16 and 11
  done
else
  echo "compute-sanitizer not found" | tee -a "$OUT/tests.log"
fi

[ "${ATTENTION_TESTS:-0}" = 1 ] && attention_tests  # no attention benchmark here

stage done
bundle_logs kernels
