#!/usr/bin/env bash
# One device-machine session: build the CUDA wheel (with the native tests), run the native
# tests, the GPU-marked Python tests and the kernel benchmark; logs under $OUT.
# Usage on the GPU machine: bash tools/gpu_session.sh  (OUT defaults to ./gpu-out)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} MOELORA_CUDA=ON \
  MOELORA_CUDA_ARCHITECTURES=${MOELORA_CUDA_ARCHITECTURES:-90a} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
start=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - start ))s)"; }

stage build
python3 -m pip install --no-build-isolation --no-deps -v . \
  -C cmake.define.MOELORA_BUILD_TESTS=ON -C cmake.define.MOELORA_BUILD_BENCH=ON \
  -C build-dir=build/gpu > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }

stage ctest
timeout ${CTEST_TIMEOUT:-120} ctest --test-dir build/gpu --output-on-failure -j8 \
  > "$OUT/ctest.log" 2>&1; tail -5 "$OUT/ctest.log"

stage pytest-gpu
(cd tests/python && timeout ${PYTEST_TIMEOUT:-200} python3 -m pytest -q --maxfail=25 -n 8 -m gpu \
  -p no:cacheprovider -rf --tb=short ${PYTEST_FILES:-.} > "$OUT/pytest-gpu.log" 2>&1)
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest-gpu.log" | tail -30
[ "${BENCH:-1}" = 1 ] || { stage done; exit 0; }

stage bench-copy
timeout 30 build/gpu/bench_adapter_copy --device cuda --mib 512 > "$OUT/bench-copy.jsonl" 2>&1
cat "$OUT/bench-copy.jsonl"

stage bench-kernels
B="python3 -m moelora.bench.kernels --iters 20 --out $OUT/h200-kernels.jsonl"
timeout ${BENCH_TIMEOUT:-150} $B --adapters 4 16 --ranks 16 --popularity uniform \
  > "$OUT/bench-kernels.log" 2>&1
tail -50 "$OUT/bench-kernels.log" | cut -c1-220
stage done
