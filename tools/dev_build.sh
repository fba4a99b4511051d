#!/usr/bin/env bash
# Developer build: configures and builds libmoelora, the _C module, the native tests and the
# benchmarks into BUILD_DIR (default build/dev), runs nothing, and copies _C next to the Python
# sources so that `PYTHONPATH=python pytest tests/python` uses it. CI and users install with pip.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build/dev}
cuda=${MOELORA_CUDA:-OFF}
cmake -S "$root" -B "$build" -G Ninja -DMOELORA_CUDA="$cuda" -DMOELORA_BUILD_PYTHON=ON \
  -DMOELORA_BUILD_TESTS=ON -DMOELORA_BUILD_BENCH=ON -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$build" -j"$(nproc)"
cp -f "$build"/_C*.so "$root/python/moelora/"
echo "built into $build; _C copied to python/moelora/"
