#!/usr/bin/env bash
# The whole test suite, on an installed moelora (`pip install ".[test]"`):
#   1. native unit tests (ctest) over a fresh CMake build of libmoelora and tests/cpp;
#   2. the embedding example, built with find_package(moelora) against the installed wheel;
#   3. the Python tests (GPU tests skip without a GPU).
# Extra arguments go to pytest, e.g. tools/run_tests.sh -k pool
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOELORA_TEST_BUILD_DIR:-$root/build/tests}
jobs=$(nproc)
# CUDA kernels in the native test build only where a GPU can run them (the wheel build compiles
# them either way); MOELORA_CUDA overrides.
if [ -z "${MOELORA_CUDA:-}" ]; then
  if nvidia-smi -L > /dev/null 2>&1; then MOELORA_CUDA=AUTO; else MOELORA_CUDA=OFF; fi
fi

echo "== native tests (ctest)"
cmake -S "$root" -B "$build" -G Ninja -DMOELORA_BUILD_TESTS=ON -DMOELORA_BUILD_BENCH=ON \
  -DMOELORA_CUDA="$MOELORA_CUDA" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$jobs"
ctest --test-dir "$build" --output-on-failure -j"$jobs"

echo "== C++ embedding example against the installed package"
prefix=$(python3 -c "import moelora; print(moelora.cmake_prefix_path())")
cmake -S "$root/examples/embed" -B "$build/embed" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$build/embed"
"$build/embed/embed_example"

echo "== python tests"
cd "$root"
python3 -m pytest tests/python -q -p no:cacheprovider "$@"
