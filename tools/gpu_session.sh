#!/usr/bin/env bash
# One device-machine session: build the CUDA wheel (with the native tests), run the native
# tests, the GPU-marked Python tests and the kernel benchmark; logs under $OUT.
# Usage on the GPU machine: bash tools/gpu_session.sh  (OUT defaults to ./gpu-out)
source "$(dirname "$0")/gpu_common.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1

stage build
build_wheel build/gpu -C cmake.define.MOELORA_BUILD_TESTS=ON -C cmake.define.MOELORA_BUILD_BENCH=ON

stage ctest
timeout ${CTEST_TIMEOUT:-120} ctest --test-dir build/gpu --output-on-failure -j8 \
  > "$OUT/ctest.log" 2>&1; tail -5 "$OUT/ctest.log"

stage pytest-gpu
(cd tests/python && timeout ${PYTEST_TIMEOUT:-200} python3 -m pytest -q --maxfail=25 -n 8 -m gpu \
  -p no:cacheprovider -rf --tb=short ${PYTEST_FILES:-.} > "$OUT/pytest-gpu.log" 2>&1)
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest-gpu.log" | tail -30
[ "${BENCH:-1}" = 1 ] || { stage done; bundle_logs session; exit 0; }

stage bench-copy
timeout 30 build/gpu/bench_adapter_copy --device cuda --mib 512 > "$OUT/bench-copy.jsonl" 2>&1
cat "$OUT/bench-copy.jsonl"

stage bench-kernels
B="python3 -m moelora.bench.kernels --iters 20 --out $OUT/h200-kernels.jsonl"
timeout ${BENCH_TIMEOUT:-150} $B --adapters 4 16 --ranks 16 --popularity uniform \
  > "$OUT/bench-kernels.log" 2>&1
tail -50 "$OUT/bench-kernels.log" | cut -c1-220
stage done
bundle_logs session
