#!/usr/bin/env bash
# Paged attention on one H200: build, the attention GPU tests with split-KV chosen by the
# heuristic and forced to 3, the engine GPU tests (they run attention every step), racecheck on
# a split-KV case, then `moelora bench attention` with split-KV and without (the baseline).
source "$(dirname "$0")/gpu_common.sh"

stage build
build_wheel build/gpu -C cmake.define.MOELORA_BUILD_TESTS=ON -C cmake.define.MOELORA_BUILD_BENCH=ON
T="python3 -m pytest -q -n 16 -m gpu -p no:cacheprovider -rf --tb=short"
stage pytest-attention
(cd tests/python && timeout 120 $T -k attention test_gpu_ops.py && \
  MOELORA_ATTN_SPLITS=3 timeout 60 $T -k attention test_gpu_ops.py && \
  timeout 120 $T test_engine_bf16.py test_decode_graphs.py) > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -8
stage racecheck
(cd tests/python && MOELORA_ATTN_SPLITS=3 timeout 90 compute-sanitizer --tool racecheck \
  python3 -m pytest -q -m gpu -p no:cacheprovider -k "attention and dtype0 and 64-0-False" \
  test_gpu_ops.py) > "$OUT/racecheck.log" 2>&1
grep -E "SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -3
stage bench-attention
for splits in auto 1; do
  if [ $splits = auto ]; then unset MOELORA_ATTN_SPLITS; else export MOELORA_ATTN_SPLITS=$splits; fi
  timeout 60 python3 -m moelora.bench.attention --iters 10 --out "$OUT/h200-attention.jsonl" \
    > /dev/null 2>> "$OUT/tests.log"
done
python3 - "$OUT/h200-attention.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = {(r["context"], r["batch"]): r["attention_us"] for r in rows if r["splits"] == "1"}
for r in rows:
    if r["splits"] == "auto":
        key = (r["context"], r["batch"])
        print(key, r["attention_us"], "us vs no split", base.get(key), "roofline", r["roofline_us"])
PY
stage done
