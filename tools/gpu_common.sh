# Sourced by tools/gpu_*.sh on a device machine: the build environment, $OUT (logs that come
# back), stage timing, and the CUDA wheel build.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} MOELORA_CUDA=ON \
  MOELORA_CUDA_ARCHITECTURES=${MOELORA_CUDA_ARCHITECTURES:-90a} PYTHONUNBUFFERED=1
start=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - start ))s)"; }

# build_wheel DIR [pip -C options...]: installs this checkout (CUDA build in DIR) into the
# current Python; the log goes to $OUT/build.log, a failure ends the script with its tail.
build_wheel() {
  local dir=$1
  shift
  python3 -m pip install --no-build-isolation --no-deps -v . -C build-dir="$dir" "$@" \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
}

# pytest_stage NAME TIMEOUT ARGS...: GPU tests from tests/python (16 workers), the log appended
# to $OUT/tests.log, the failures and the summary line printed.
pytest_stage() {
  local name=$1 limit=$2
  shift 2
  stage "$name"
  (cd tests/python && timeout "$limit" python3 -m pytest -q -n 16 -m gpu -p no:cacheprovider -rf \
    --tb=short --durations=5 "$@" > "$OUT/$name.log" 2>&1)
  cat "$OUT/$name.log" >> "$OUT/tests.log"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/$name.log" | tail -12; rm "$OUT/$name.log"
}

# attention_tests: the attention kernels' GPU tests, split-KV chosen by the heuristic, then
# forced to 3 (gpu_attention.sh, and gpu_kernels.sh with ATTENTION_TESTS=1).
attention_tests() {
  pytest_stage pytest-attention 120 -k attention test_gpu_ops.py
  MOELORA_ATTN_SPLITS=3 pytest_stage pytest-attention-split3 60 -k attention test_gpu_ops.py
}

# bundle_logs NAME: the *.log and *.txt files of $OUT into $OUT/NAME-logs.tgz (removed after).
# The device tool brings back at most 8 files, so scripts run together in one call each leave
# their JSON results plus one bundle.
bundle_logs() {
  local files
  files=$(cd "$OUT" && ls -- *.log *.txt 2>/dev/null)
  [ -n "$files" ] || return 0
  (cd "$OUT" && tar czf "$1-logs.tgz" $files && rm -f $files)
}
