#!/usr/bin/env bash
# A/B of a source change on a GPU machine, both sides built and timed in one run:
#
#   tools/gpu_ab.sh PATCH OUT_DIR [ROUNDS] -- BENCH_COMMAND...
#
# Side "new" is this tree, installed into the running Python as tools/gpu_check.sh's build
# stage does; side "base" is a copy of the build inputs with PATCH reverted (PATCH: `git diff
# BASE -- cuda src include ...` of the change), installed into a --target directory put first on
# PYTHONPATH for its rounds. BENCH_COMMAND then runs ROUNDS times (default 2) for each side,
# alternating new, base, new, base, with `--out OUT_DIR/<side>.jsonl` appended. OUT_DIR gets
# those two files and ab.log (every build and round's output); the builds go to AB_WORK
# (default ${TMPDIR:-/tmp}/moelora-ab). E.g.
#
#   git diff origin/main -- cuda src > /tmp/change.patch
#   tools/gpu_ab.sh /tmp/change.patch /tmp/ab -- python3 -m moelora.bench.moe \
#     --presets gpt-oss-20b --weights mxfp4 --tokens 1 16 64 --variants plan --no-torch
#
# Compare medians of the two files only: both come from one machine and one run.
set -uo pipefail
if [ $# -lt 4 ] || [[ " $* " != *" -- "* ]]; then
  echo "usage: $0 PATCH OUT_DIR [ROUNDS] -- BENCH_COMMAND..." >&2
  exit 2
fi
patch_file=$(realpath "$1")
mkdir -p "$2"
out=$(cd "$2" && pwd)
shift 2
rounds=2
if [ "$1" != "--" ]; then
  rounds=$1
  shift
fi
shift  # the "--"
root=$(cd "$(dirname "$0")/.." && pwd)
export MOELORA_CUDA=${MOELORA_CUDA:-ON} MOELORA_CUDA_ARCHITECTURES=${MOELORA_CUDA_ARCHITECTURES:-90a}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} PYTHONUNBUFFERED=1
work=${AB_WORK:-${TMPDIR:-/tmp}/moelora-ab}
base_src=$work/base-src
base_site=$work/base-site
log=$out/ab.log
rm -rf "$base_src" "$base_site"
mkdir -p "$base_src"
(cd "$root" && cp -r CMakeLists.txt pyproject.toml README.md cmake include src cuda python \
  "$base_src"/)
if ! (cd "$base_src" && patch -s -R -p1 < "$patch_file"); then
  echo "$patch_file does not revert cleanly from this tree" >&2
  exit 1
fi

# run NAME COMMAND...: the command's output appended to ab.log under a header
run() {
  local name=$1
  shift
  echo "== $name" | tee -a "$log"
  "$@" >> "$log" 2>&1
}

: > "$log"
(cd "$root" && python3 -m pip install -q --no-build-isolation --no-deps . \
  -C build-dir="$root/build/gpu-ab-new") > "$work/build-new.log" 2>&1 &
new_pid=$!
run "build base" bash -c "cd '$base_src' && python3 -m pip install -q --no-build-isolation \
  --no-deps --target '$base_site' . -C build-dir='$base_src/build'"
base_status=$?
wait $new_pid
new_status=$?
echo "== build new" >> "$log"
cat "$work/build-new.log" >> "$log"
if [ $new_status -ne 0 ] || [ $base_status -ne 0 ]; then
  echo "build failed (new $new_status, base $base_status): see $log" >&2
  exit 1
fi

status=0
for round in $(seq "$rounds"); do
  run "round $round: new" "$@" --out "$out/new.jsonl" || status=1
  run "round $round: base" env PYTHONPATH="$base_site${PYTHONPATH:+:$PYTHONPATH}" "$@" \
    --out "$out/base.jsonl" || status=1
done
exit $status
