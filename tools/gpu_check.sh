#!/usr/bin/env bash
# Builds moelora with its CUDA backend on this machine and checks it: the native tests, every
# GPU-marked Python test, compute-sanitizer on a slice of the kernel tests, the kernel, attention
# and engine benchmarks, and the cold adapter path. Runs on any machine with a CUDA GPU, nvcc and a
# Python that has torch and the test dependencies (`pip install -e ".[test]"`'s list); nothing is
# fetched.
#
#   tools/gpu_check.sh OUT_DIR
#
# Everything it writes goes to OUT_DIR: one log per stage, the benchmarks' JSON lines
# (kernels.jsonl, attention.jsonl, bench_kernels.jsonl, offline.jsonl, adapter_load.jsonl,
# adapters.jsonl, cold_ttft.jsonl), compare.txt (the new kernel timings, forms and block sizes
# against a reference grid) and summary.txt (each stage's exit status). The exit status is non-zero
# when a stage failed.
# Environment: STAGES (default "build ctest tests sanitize bench offline adapters"; any subset, in
# that order; the build and the installed package persist between invocations), REFERENCE (the grid
# compare.txt compares with; default bench/results/h200-kernels.jsonl, an H200: for another card
# give a kernels.jsonl of the baseline measured on that card), MOELORA_CUDA_ARCHITECTURES (default
# 90a), PYTEST_WORKERS (default 8 when pytest-xdist is installed), BENCH_ITERS (default 20).
set -uo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stages=${STAGES:-build ctest tests sanitize bench offline adapters}
build=$root/build/gpu-check
iters=${BENCH_ITERS:-20}
export MOELORA_CUDA=ON MOELORA_CUDA_ARCHITECTURES=${MOELORA_CUDA_ARCHITECTURES:-90a}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} PYTHONUNBUFFERED=1
start=$(date +%s)
failed=0
: > "$out/summary.txt"

wants() { [[ " $stages " == *" $1 "* ]]; }

# run NAME COMMAND...: the command's output to OUT_DIR/NAME.log, its status to summary.txt.
run() {
  local name=$1
  shift
  echo "== $name ($(($(date +%s) - start)) s)"
  "$@" > "$out/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status" >> "$out/summary.txt"
  tail -3 "$out/$name.log"
  [ $status -eq 0 ] || failed=1
  return $status
}

pytest_gpu() {
  local workers=()
  if python3 -c "import xdist" 2> /dev/null; then workers=(-n "${PYTEST_WORKERS:-8}"); fi
  python3 -m pytest tests/python -m gpu -q -p no:cacheprovider -rf --tb=short "${workers[@]}" "$@"
}

{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  nvcc --version | tail -2
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
  git -C "$root" log -1 --format="commit %H %s"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

if wants build; then
  run build python3 -m pip install --no-build-isolation --no-deps -v . -C build-dir="$build" \
    -C cmake.define.MOELORA_BUILD_TESTS=ON -C cmake.define.MOELORA_BUILD_BENCH=ON || {
    echo "build failed: see $out/build.log"
    exit 1
  }
fi

wants ctest && run ctest ctest --test-dir "$build" --output-on-failure

if wants tests; then
  run tests pytest_gpu --junitxml="$out/tests.xml" --durations=10
  # the engine with prefill spans through SDPA (the GPU plan takes the paged kernel): the one
  # choice no kernel test forces, so the debugging override (docs/debugging.md) does here
  run tests-prefill-sdpa env MOELORA_PLAN=prefill_attention=sdpa \
    python3 -m pytest tests/python/test_engine_bf16.py -m gpu -q -p no:cacheprovider -rf
fi

# compute-sanitizer on one process per slice: every LoRA kernel family, the cooperative align,
# kernels chained with programmatic dependent launch, the 16-wide decode clusters, split-KV.
sanitize() {
  local tool=$1
  shift
  compute-sanitizer --tool "$tool" --error-exitcode 9 \
    python3 -m pytest tests/python -m gpu -q -p no:cacheprovider --tb=short "$@"
}
if wants sanitize; then
  if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck; do
      run "sanitize-$tool-forms" sanitize "$tool" tests/python/test_gpu_lora_forms.py \
        -k "7-888 or 133-111 or wide_clusters and 7-"
      run "sanitize-$tool-mma" sanitize "$tool" tests/python/test_gpu_ops.py \
        -k "mma_prefill and 133-888 and split3"
      run "sanitize-$tool-align" sanitize "$tool" tests/python/test_gpu_ops.py \
        -k "align_matches and multi and 2100"
      run "sanitize-$tool-pdl" sanitize "$tool" tests/python/test_gpu_dependent_launch.py \
        -k "unsorted-auto-7-888 or mma-133-888-64"
      attention="kv_cache_and_paged_attention and dtype0 and (1-64-0-False or 8-64-0-True)"
      run "sanitize-$tool-attention" sanitize "$tool" tests/python/test_gpu_ops.py \
        -k "split3 and (odd_page_size or $attention)"
    done
  else
    echo "sanitize: compute-sanitizer not found, skipped" | tee -a "$out/summary.txt"
  fi
fi

if wants bench; then
  rm -f "$out/kernels.jsonl" "$out/attention.jsonl" "$out/bench_kernels.jsonl"
  grid=(python3 -m moelora.bench.kernels --iters "$iters" --adapters 4 16 --ranks 16
    --popularity uniform --out "$out/kernels.jsonl")
  # decode sizes time both forms (the record keeps the faster and both times); prefill sizes the
  # plan's form
  run bench-decode "${grid[@]}" --tokens 1 8 32 128 --form both
  run bench-prefill "${grid[@]}" --tokens 512 2048 8192 \
    --presets gpt-oss-20b qwen3-30b-a3b mixtral-8x7b
  run bench-attention python3 -m moelora.bench.attention --kernels auto gqa per_head \
    --splits auto 1 --out "$out/attention.jsonl"
  # GPT-OSS's layout: 64 query heads on 8 KV heads of head_dim 64
  run bench-attention-gpt-oss python3 -m moelora.bench.attention --kernels auto gqa \
    --num-heads 64 --num-kv-heads 8 --head-dim 64 --context-lens 1024 32768 \
    --out "$out/attention.jsonl"
  run bench-native bash -c "for t in 1 8 128 2048; do '$build/bench_kernels' \$t 4 16; done \
    > '$out/bench_kernels.jsonl'"
  python3 - "${REFERENCE:-$root/bench/results/h200-kernels.jsonl}" "$out/kernels.jsonl" \
    > "$out/compare.txt" 2>&1 << 'PY'
import json, math, sys

def cases(path):
    keyed = {}
    for line in open(path):
        r = json.loads(line)
        keyed[(r["preset"], r["tokens"], r["adapters"], r["rank"], r["popularity"])] = r
    return keyed

old, new = cases(sys.argv[1]), cases(sys.argv[2])
devices = {r["device"] for r in old.values()} | {r["device"] for r in new.values()}
print("reference:", sys.argv[1], "| this run:", sys.argv[2], "| devices:", sorted(devices))
print("case                         form old->new  block_m  us old -> new  ratio")
ratios = []
for key in sorted(new):
    n, o = new[key], old.get(key)
    if o is None:
        continue
    same = "" if (o["form"], o["block_m"]) == (n["form"], n["block_m"]) else "  CHANGED"
    ratio = n["lora_us"] / o["lora_us"]
    ratios.append(ratio)
    print(f"{key[0][:14]:14} {key[1]:5}/{key[2]:<3} {o['form'][:4]}->{n['form'][:4]}  "
          f"{o['block_m']:>3}->{n['block_m']:<3} {o['lora_us']:8.1f} -> {n['lora_us']:8.1f}"
          f"  {ratio:.3f}{same}")
if ratios:
    print(f"geometric mean new/old over {len(ratios)} cases: "
          f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}"
          " (compare only when both runs are on the same card)")
PY
  tail -2 "$out/compare.txt"
fi

if wants offline; then
  rm -f "$out/offline.jsonl"
  offline=(python3 -m moelora.bench.offline --model synthetic:qwen3-30b-a3b --num-layers 8
    --num-adapters 8 --max-loras 8 --device cuda --dtype bfloat16
    --adapter-dir "$out/offline-adapters" --out "$out/offline.jsonl")
  run offline-decode "${offline[@]}" --num-prompts 64 --input-len 128 --output-len 64
  run offline-prefill "${offline[@]}" --num-prompts 16 --input-len 2048 --output-len 16
  rm -rf "$out/offline-adapters"
fi

# The cold adapter path, page cache dropped: one load's disk -> device with its copy streamed
# beside the read against read then copied (bench_adapter_load's disk_to_device and its
# read_then_copy_ms), the engine's loads against a plain read, and a cold request's TTFT against
# its bound while 16 sequences decode.
if wants adapters; then
  rm -f "$out/adapter_load.jsonl" "$out/adapters.jsonl" "$out/cold_ttft.jsonl"
  run adapter-load bash -c "'$build/bench_adapter_load' --preset gpt-oss-20b --layers 24 \
    --threads 4 --repeats 3 --cold --device cuda > '$out/adapter_load.jsonl'"
  run adapters python3 -m moelora.bench.adapters --model synthetic:gpt-oss-20b \
    --num-adapters 4 --threads 4 --repeats 2 --out "$out/adapters.jsonl"
  run cold-ttft python3 -m moelora.bench.cold_ttft --model synthetic:gpt-oss-20b \
    --num-adapters 4 --background-seqs 16 --out "$out/cold_ttft.jsonl"
fi

echo "== done ($(($(date +%s) - start)) s)"
cat "$out/summary.txt"
exit $failed
