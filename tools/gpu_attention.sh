#!/usr/bin/env bash
# Paged attention on one H200: build, the attention GPU tests (every kernel: per-head, GQA, mma)
# with split-KV chosen by the heuristic and forced to 3, the engine GPU tests (they run
# attention every step), racecheck on a split-KV case, then `moelora bench attention`: the
# tensor-core GQA, CUDA-core GQA and per-head kernels with split-KV, per-head and mma without
# (the baselines), and GPT-OSS's head layout.
source "$(dirname "$0")/gpu_common.sh"

stage build
build_wheel build/gpu -C cmake.define.MOELORA_BUILD_TESTS=ON -C cmake.define.MOELORA_BUILD_BENCH=ON
attention_tests
pytest_stage pytest-engine 120 test_engine_bf16.py test_decode_graphs.py
MOELORA_PREFILL_ATTENTION=sdpa pytest_stage pytest-engine-sdpa 120 test_engine_bf16.py
stage racecheck
(cd tests/python && MOELORA_ATTN_SPLITS=3 timeout 90 compute-sanitizer --tool racecheck \
  python3 -m pytest -q -m gpu -p no:cacheprovider -k "attention and dtype0 and (1-64-0-False or 8-64-0-True)" \
  test_gpu_ops.py) > "$OUT/racecheck.log" 2>&1
grep -E "SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -3
stage memcheck  # every kernel on odd page sizes, splits forced: out-of-range reads show here
(cd tests/python && MOELORA_ATTN_SPLITS=3 timeout 90 compute-sanitizer --tool memcheck \
  python3 -m pytest -q -m gpu -p no:cacheprovider -k "odd_page_size or (attention and dtype0 and 16-128)" \
  test_gpu_ops.py) > "$OUT/memcheck.log" 2>&1
grep -E "SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3
stage bench-attention
A="timeout 90 python3 -m moelora.bench.attention --iters 10 --out $OUT/h200-attention.jsonl"
$A --kernels mma gqa per_head > /dev/null 2>> "$OUT/attention-tests.log"
MOELORA_ATTN_SPLITS=1 $A --kernels per_head mma > /dev/null 2>> "$OUT/attention-tests.log"
# GPT-OSS's layout: 64 query heads on 8 KV heads of head_dim 64
$A --kernels mma gqa --num-heads 64 --num-kv-heads 8 --head-dim 64 --context-lens 1024 32768 \
  > /dev/null 2>> "$OUT/attention-tests.log"
python3 - "$OUT/h200-attention.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
table = {}
for r in rows:
    name = r["kernel"] + ("" if r["splits"] == "auto" else "/splits=" + r["splits"])
    shape = (r["num_heads"], r["num_kv_heads"], r["head_dim"], r["context"], r["batch"])
    table.setdefault(shape, {"roofline": r["roofline_us"]})[name] = r["attention_us"]
for shape, times in table.items():
    print(shape, " ".join(f"{k} {v}" for k, v in times.items()))
PY
stage done
bundle_logs attention
