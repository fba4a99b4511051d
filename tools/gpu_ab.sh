#!/usr/bin/env bash
# A/B of a kernel change on one H200, in one call: builds this checkout (B) and a baseline (A:
# this checkout with the files under $AB_BASE laid over it, or, with $AB_ENV_A instead, this
# checkout's build run under that environment, e.g. AB_ENV_A="MOELORA_PDL=0"), then times the
# grid (no base; $AB_FORM, default grouped; $AB_TOKENS, default the prefill sizes) with each,
# interleaved: A, B, A, B (AB_ROUNDS rounds), so drift in clocks shows up as A-vs-A spread.
# Before timing, B runs the tensor-core GPU tests (AB_TESTS=0 skips them).
# $AB_ENV_C adds a third side, C: this checkout's build under that environment.
# $AB_EXTRA: more bench arguments for all (e.g. "--block-m 16"); $AB_SWEEP_BLOCK_M: block sizes
# timed with B only after the rounds. JSON lines in $OUT/ab.jsonl, kernel_version "A<i>" / "B<i>".
# Making a baseline folder: e.g. session 6's v3e baseline was
#   mkdir -p .exp/v3e/cuda && for f in cuda/lora/prefill.cu cuda/common/ptx.cuh; do
#     git show 95f53d5:$f > .exp/v3e/$f; done
# and the call `AB_BASE=.exp/v3e bash tools/gpu_ab.sh`. Keep such a folder out of commits; if git
# ignores it, name it in the device call's carry (ignored paths travel only when carried).
source "$(dirname "$0")/gpu_common.sh"
[ -n "${AB_BASE:-}" ] || [ -n "${AB_ENV_A:-}" ] ||
  { echo "set AB_BASE (a folder of repo-relative files that make the baseline) or AB_ENV_A"; exit 2; }
here=$(pwd)
wheel() {  # wheel SIDE SRC: the CUDA wheel of SRC into /tmp/ab-wheel-SIDE
  rm -rf "/tmp/ab-wheel-$1"
  (cd "$2" && python3 -m pip wheel --no-build-isolation --no-deps -w "/tmp/ab-wheel-$1" . \
    -C build-dir="$here/build/gpu-ab-$1" > "$OUT/build-$1.log" 2>&1) \
    || { tail -40 "$OUT/build-$1.log"; exit 1; }
}
if [ -n "${AB_BASE:-}" ]; then
  stage "build A (baseline: $AB_BASE)"
  rm -rf /tmp/ab-a && mkdir -p /tmp/ab-a
  tar -C "$here" --exclude=./build --exclude=./.exp --exclude=./.git -cf - . | tar -C /tmp/ab-a -xf -
  cp -r "$AB_BASE"/. /tmp/ab-a/
  wheel a /tmp/ab-a
fi
stage "build B (this checkout)"
wheel b "$here"
installed=
use() {  # the wheel of side $1 (A is B's wheel when the baseline is an environment; C always)
  local side=$1
  { [ -z "${AB_BASE:-}" ] || [ "$side" = c ]; } && side=b
  [ "$installed" = "$side" ] && return
  python3 -m pip install --no-deps --force-reinstall -q /tmp/ab-wheel-$side/*.whl > /dev/null 2>&1
  installed=$side
}
use b
if [ "${AB_TESTS:-1}" = 1 ]; then
  MOELORA_LORA_KERNEL=mma pytest_stage tests-b-mma 150 -k "fused_moe_lora or dense_lora" \
    test_gpu_ops.py
  pytest_stage tests-b-forms 150 test_gpu_lora_forms.py
fi
B="python3 -m moelora.bench.kernels --iters 20 --ranks 16 --popularity uniform --no-base
   --form ${AB_FORM:-grouped} --tokens ${AB_TOKENS:-512 2048 8192} --adapters 4 16 --settle-s 0.5
   --out $OUT/ab.jsonl ${AB_EXTRA:-}"
for i in $(seq 1 "${AB_ROUNDS:-2}"); do
  for side in a b ${AB_ENV_C:+c}; do
    stage "bench $side round $i"
    use $side
    side_env=()
    [ "$side" = a ] && [ -n "${AB_ENV_A:-}" ] && read -ra side_env <<< "$AB_ENV_A"
    [ "$side" = c ] && read -ra side_env <<< "$AB_ENV_C"
    timeout 120 env "${side_env[@]}" $B --version "${side^^}$i" > /dev/null 2>> "$OUT/bench.log"
  done
done
for bm in ${AB_SWEEP_BLOCK_M:-}; do
  stage "bench B block_m $bm"
  timeout 120 $B --block-m "$bm" --version "B-bm$bm" > /dev/null 2>> "$OUT/bench.log"
done
python3 - "$OUT/ab.jsonl" <<'PY'
import collections, json, math, statistics, sys
runs = collections.defaultdict(dict)
for r in map(json.loads, open(sys.argv[1])):
    runs[r["kernel_version"]][(r["preset"], r["tokens"], r["adapters"])] = r["lora_us"]
names = sorted(runs)
keys = sorted(set.intersection(*(set(v) for v in runs.values())))
print("case".ljust(28), *(n.rjust(9) for n in names))
for k in keys:
    print(f"{k[0][:12]} {k[1]:5d}/{k[2]:<3d}".ljust(28), *(f"{runs[n][k]:9.1f}" for n in names))
base = runs[names[0]]
for n in names:
    g = math.exp(statistics.fmean(math.log(runs[n][k] / base[k]) for k in keys))
    print(f"{n}: geomean vs {names[0]} {g:.3f}")
PY
stage done
bundle_logs ab
