#!/usr/bin/env bash
# Tensor/expert parallel on a 2-GPU device machine: build the CUDA wheel, run the NCCL tests
# (tests/python/test_distributed_gpu.py) and the offline benchmark on synthetic mixtral-8x7b
# with TP=1, TP=2, TP=2 + expert parallel and TP=2 with decode graphs ("2g") in one session;
# logs under $OUT.
# Usage: STAGES="build test bench" bash tools/gpu_distributed.sh   (default: all three)
source "$(dirname "$0")/gpu_common.sh"
STAGES=${STAGES:-build test bench}
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/gpus.txt" 2>&1
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has build; then
  stage build
  build_wheel build/gpu-dist
fi

if has test; then
  stage test-nccl
  (cd tests/python && timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -s -m gpu \
    -p no:cacheprovider -rf --tb=short test_distributed_gpu.py > "$OUT/pytest-dist.log" 2>&1)
  grep -E "bf16:|^(FAILED|ERROR)|passed|failed" "$OUT/pytest-dist.log" | tail -20
fi

if has bench; then
  # 16 rank-16 adapters (attention + experts), zipf popularity, all requests at once.
  B="python3 -m moelora.bench.offline --model synthetic:mixtral-8x7b --num-layers ${LAYERS:-8}
     --num-adapters 16 --max-loras 16 --rank 16 --num-prompts ${PROMPTS:-256} --input-len 256
     --output-len 128 --max-num-seqs 128 --device cuda --dtype bfloat16
     --adapter-dir /tmp/moelora-bench-adapters --out $OUT/tp-offline.jsonl"
  for tp in ${TPS:-1 2 2ep 2g}; do
    stage "bench-tp$tp"
    n=${tp%ep}; n=${n%g}
    extra="--tensor-parallel-size $n"
    [[ $tp == *ep ]] && extra="$extra --enable-expert-parallel"
    [[ $tp == *g ]] && extra="$extra --decode-graphs"
    timeout ${BENCH_TIMEOUT:-200} $B $extra > "$OUT/bench-tp$tp.log" 2>&1
    python3 - "$OUT/tp-offline.jsonl" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])][-1]
print({k: r[k] for k in ("tensor_parallel_size", "enable_expert_parallel", "decode_graphs",
                         "throughput_ratio")},
      "with", round(r["with_adapters"]["output_tokens_per_s"]), "tok/s",
      "tpot p50", round(r["with_adapters"]["tpot_p50_ms"], 1), "ms;",
      "none", round(r["no_adapters"]["output_tokens_per_s"]), "tok/s")
PY
  done
fi
stage done
bundle_logs distributed
