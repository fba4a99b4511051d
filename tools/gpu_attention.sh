#!/usr/bin/env bash
# Paged attention on one H200: build, the attention GPU tests (both kernels: per-head and GQA)
# with split-KV chosen by the heuristic and forced to 3, the engine GPU tests (they run
# attention every step), racecheck on a split-KV case, then `moelora bench attention`: per-head
# with split-KV, without (the baseline), and the GQA kernel.
source "$(dirname "$0")/gpu_common.sh"

stage build
build_wheel build/gpu -C cmake.define.MOELORA_BUILD_TESTS=ON -C cmake.define.MOELORA_BUILD_BENCH=ON
T="python3 -m pytest -q -n 16 -m gpu -p no:cacheprovider -rf --tb=short"
stage pytest-attention
(cd tests/python && timeout 120 $T -k attention test_gpu_ops.py && \
  MOELORA_ATTN_SPLITS=3 timeout 60 $T -k attention test_gpu_ops.py && \
  timeout 120 $T test_engine_bf16.py test_decode_graphs.py) > "$OUT/attention-tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/attention-tests.log" | tail -8
stage racecheck
(cd tests/python && MOELORA_ATTN_SPLITS=3 timeout 90 compute-sanitizer --tool racecheck \
  python3 -m pytest -q -m gpu -p no:cacheprovider -k "attention and dtype0 and 64-0-False" \
  test_gpu_ops.py) > "$OUT/racecheck.log" 2>&1
grep -E "SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -3
stage bench-attention
A="timeout 60 python3 -m moelora.bench.attention --iters 10 --out $OUT/h200-attention.jsonl"
$A > /dev/null 2>> "$OUT/attention-tests.log"
MOELORA_ATTN_SPLITS=1 $A > /dev/null 2>> "$OUT/attention-tests.log"
MOELORA_ATTN_KERNEL=gqa $A > /dev/null 2>> "$OUT/attention-tests.log"
python3 - "$OUT/h200-attention.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
def pick(splits, kernel):
    return {(r["context"], r["batch"]): r["attention_us"] for r in rows
            if r["splits"] == splits and r.get("kernel", "auto") == kernel}
split, no_split, gqa = pick("auto", "auto"), pick("1", "auto"), pick("auto", "gqa")
for r in rows:
    key = (r["context"], r["batch"])
    if r["splits"] == "auto" and r.get("kernel", "auto") == "auto":
        print(key, "per-head", split[key], "no split", no_split.get(key), "gqa", gqa.get(key),
              "roofline", r["roofline_us"])
PY
stage done
