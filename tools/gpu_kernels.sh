#!/usr/bin/env bash
# Kernel iteration on one H200: build the CUDA wheel, run ctest, the GPU tests of the LoRA kernel
# families (tests/python/test_gpu_lora_forms.py, and test_gpu_ops.py with the tensor-core family
# forced), then the kernel benchmark: decode shapes timing both forms (grouped vs unsorted),
# prefill shapes with the cluster and the mma family; then the offline engine benchmark with
# eager and CUDA-graph decode steps. Logs and JSON lines under $OUT (at most 8 files come back).
source "$(dirname "$0")/gpu_common.sh"

stage build
build_wheel build/gpu -C cmake.define.MOELORA_BUILD_TESTS=ON -C cmake.define.MOELORA_BUILD_BENCH=ON
stage ctest
timeout 120 ctest --test-dir build/gpu --output-on-failure -j8 > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"

stage pytest-forms
(cd tests/python && timeout ${FORMS_TIMEOUT:-150} python3 -m pytest -q -n 16 -m gpu -p no:cacheprovider \
  -rf --tb=short test_gpu_lora_forms.py test_engine_bf16.py test_decode_graphs.py \
  > "$OUT/pytest-forms.log" 2>&1); cat "$OUT/pytest-forms.log" >> "$OUT/tests.log"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest-forms.log" | tail -12; rm "$OUT/pytest-forms.log"
stage pytest-mma
(cd tests/python && MOELORA_LORA_KERNEL=mma timeout ${MMA_TIMEOUT:-120} python3 -m pytest -q -n 16 -m gpu \
  -p no:cacheprovider -rf --tb=short -k "fused_moe_lora or dense_lora" test_gpu_ops.py \
  > "$OUT/pytest-mma.log" 2>&1); cat "$OUT/pytest-mma.log" >> "$OUT/tests.log"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest-mma.log" | tail -12; rm "$OUT/pytest-mma.log"

B="python3 -m moelora.bench.kernels --iters 20 --adapters 4 16 --ranks 16 --popularity uniform --version v2"
stage bench-decode
timeout ${DECODE_TIMEOUT:-110} $B --tokens 1 8 32 128 --form both --out $OUT/h200-kernels.jsonl \
  >> "$OUT/bench.log" 2>&1
cut -c1-200 "$OUT/bench.log" | tail -3
for family in cluster mma; do
  stage "bench-prefill-$family"
  MOELORA_LORA_KERNEL=$family timeout ${PREFILL_TIMEOUT:-70} $B --tokens 512 2048 8192 --adapters 4 16 \
    --presets gpt-oss-20b qwen3-30b-a3b mixtral-8x7b --out $OUT/h200-kernels.jsonl \
    >> "$OUT/bench.log" 2>&1
  cut -c1-200 "$OUT/bench.log" | tail -2
done
stage bench-offline  # eager vs CUDA-graph decode steps, same workload
O="python3 -m moelora.bench.offline --model synthetic:qwen3-30b-a3b --num-layers 8 --num-adapters 8
   --max-loras 8 --num-prompts 64 --input-len 128 --output-len 64 --device cuda --dtype bfloat16
   --adapter-dir /tmp/moelora-offline-adapters --out $OUT/offline.jsonl"
timeout ${OFFLINE_TIMEOUT:-120} $O >> "$OUT/bench.log" 2>&1
timeout ${OFFLINE_TIMEOUT:-120} $O --decode-graphs >> "$OUT/bench.log" 2>&1
python3 - "$OUT/offline.jsonl" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print("graphs" if r["decode_graphs"] else "eager ", "replays", r["decode_graph_replays"],
          "tok/s with", round(r["with_adapters"]["output_tokens_per_s"]), "without",
          round(r["no_adapters"]["output_tokens_per_s"]), "TPOT p50",
          round(r["with_adapters"]["tpot_p50_ms"], 2), "ms")
PY
stage done
