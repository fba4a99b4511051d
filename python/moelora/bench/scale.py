"""`moelora bench scale`: throughput as the number of adapters grows past what the GPU holds.

S-LoRA's claim to beat: serving 2000 adapters costs under 10% of the throughput of serving 5.
One engine (one process) runs the same workload (random prompts, fixed arrival rate or all at
once, ignore_eos) once with no adapters and once per adapter count in --adapter-counts, each
request drawing its adapter uniformly or by zipf popularity from that many random adapters,
with only --max-loras device slots and --max-cpu-loras host copies: adapters stream from disk
to host to GPU while requests run. Prints a table and one JSON record: per count, output
tokens/s, request throughput, TTFT/TPOT p50/p99, device loads and evictions, and the throughput
relative to the smallest count and to no adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile

from moelora.bench.offline import _run, engine_fields, random_workload, save_record


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="synthetic:tiny-moe")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="synthetic models only: fewer layers than the preset")
    parser.add_argument("--adapter-counts", nargs="+", type=int, default=[8, 32, 128, 512])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=32, help="device slots")
    parser.add_argument("--max-cpu-loras", type=int, default=64, help="host copies kept")
    parser.add_argument("--popularity", choices=["uniform", "zipf"], default="uniform")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="Poisson arrivals per second (inf: all at once)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter-dir", default=None,
                        help="where to write the adapters (reused when they exist)")
    parser.add_argument("--out", default=None, help="append the JSON record to this file")
    return parser


def _adapter(adapter_dir: str, index: int, sites, rank: int, seed: int) -> str:
    from moelora.bench.synthetic_adapters import write_random_adapter

    path = os.path.join(adapter_dir, f"a{index}")
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        write_random_adapter(path, sites, rank, seed=seed + index)
    return path


def run_from_args(args) -> int:
    from moelora import LoRARequest, SamplingParams
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    counts = sorted(set(args.adapter_counts))
    if counts[0] < 1:
        raise SystemExit(f"--adapter-counts must be positive, got {counts}")
    rng = random.Random(args.seed)
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          enable_lora=True, max_lora_rank=args.rank, max_loras=args.max_loras,
                          max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
                          load_progress=False, synthetic_num_layers=args.num_layers)
    engine = LLMEngine(config)
    adapter_dir = args.adapter_dir or tempfile.mkdtemp(prefix="moelora-bench-scale-")
    sites = engine.model.lora_sites()
    vocab = engine.model.config.vocab_size
    prompts, arrivals = random_workload(rng, vocab, args.num_prompts, args.input_len,
                                        args.request_rate)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    # Adapter ids are unique across counts, so every count starts with cold device slots.
    next_id = 1

    results = []
    try:
        # warm-up on the whole workload (its batch shapes: decode graphs, allocator pools), so
        # that the no-adapter baseline does not pay it (bench/offline.py, session 9)
        _run(engine, prompts, [None] * len(prompts), params, arrivals)
        base = _run(engine, prompts, [None] * len(prompts), params, arrivals)
        for count in counts:
            loras = []
            for index in range(count):
                loras.append(LoRARequest(f"n{count}-a{index}", next_id,
                                         _adapter(adapter_dir, index, sites, args.rank,
                                                  args.seed)))
                next_id += 1
            weights = [1.0 / (i + 1) if args.popularity == "zipf" else 1.0
                       for i in range(count)]
            chosen = [rng.choices(loras, weights)[0] for _ in prompts]
            before = engine.adapters.stats()
            run = _run(engine, prompts, chosen, params, arrivals)
            after = engine.adapters.stats()
            run.update(num_adapters=count,
                       distinct_adapters_used=len({lora.lora_int_id for lora in chosen}),
                       requests_per_s=len(prompts) / run["duration_s"],
                       device_loads=after["device_loads"] - before["device_loads"],
                       device_evictions=after["device_evictions"] - before["device_evictions"])
            results.append(run)
            for name in {lora.lora_name for lora in chosen}:  # free the registrations and
                engine.adapters.unload(name)                  # copies before the next count
    finally:
        engine.stop()

    first = results[0]["output_tokens_per_s"]
    for run in results:
        run["relative_to_fewest"] = run["output_tokens_per_s"] / first
        run["relative_to_no_adapters"] = run["output_tokens_per_s"] / base["output_tokens_per_s"]
    record = {
        "bench": "scale", "model": args.model, **engine_fields(engine), "rank": args.rank,
        "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras,
        "popularity": args.popularity, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len,
        "request_rate": args.request_rate, "no_adapters": base, "by_count": results,
        "max_drop": 1.0 - min(r["relative_to_fewest"] for r in results),
    }
    print(f"{'adapters':>9} {'out tok/s':>10} {'req/s':>7} {'TTFT p50 ms':>12} "
          f"{'TPOT p50 ms':>12} {'loads':>6} {'vs fewest':>10}")
    print(f"{'none':>9} {base['output_tokens_per_s']:>10.1f} "
          f"{len(prompts) / base['duration_s']:>7.2f} {base['ttft_p50_ms']:>12.1f} "
          f"{base['tpot_p50_ms']:>12.1f} {0:>6} {'':>10}")
    for run in results:
        print(f"{run['num_adapters']:>9} {run['output_tokens_per_s']:>10.1f} "
              f"{run['requests_per_s']:>7.2f} {run['ttft_p50_ms']:>12.1f} "
              f"{run['tpot_p50_ms']:>12.1f} {run['device_loads']:>6} "
              f"{run['relative_to_fewest']:>10.3f}")
    print(json.dumps(record))
    save_record(record, args.out)
    return 0


def main(argv=None) -> int:
    return run_from_args(add_cli_args(argparse.ArgumentParser(description=__doc__)).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
