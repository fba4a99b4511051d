"""`moelora bench offline`: end-to-end offline throughput with many adapters.

One workload (random prompts of --input-len tokens, --output-len generated tokens each with
ignore_eos, arrivals all at once or Poisson at --request-rate) runs several times in one process:
first once with no adapters as a warm-up (the engine meets this workload's batch shapes: decode
graphs captured, allocator pools grown), discarded; then with adapters (--num-adapters random
rank---rank adapters on attention and experts, popularity uniform or zipf, --max-loras resident
at once), which starts cold, every adapter read from disk when first asked for; then --repeats
rounds of the same requests with no adapters and again with adapters (warm: whatever the runs
before left resident; with more adapters than --max-loras, loads and evictions continue).
Prints and saves one JSON record: output tokens/s, TTFT and TPOT p50/p99 of the cold run and the
per-field medians of the rounds (each round's TPOT p50 and tokens/s listed too, to show the
spread), adapter loads and their bandwidth, pool pages by kind, and the ratios to the no-adapter
runs. (The warm-up comes first because a no-adapter run that paid it would read slower than the
warm run with adapters; and one run each moves a setting's TPOT by up to 16% on the H200.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

from moelora.entrypoints.graph_flags import add_graph_arguments, graphs_choice


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="synthetic:tiny-moe")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="build only this many layers of a synthetic model")
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--popularity", choices=["uniform", "zipf"], default="zipf")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--request-rate", type=float, default=float("inf"))
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="processes, one per GPU (moelora.distributed)")
    parser.add_argument("--enable-expert-parallel", action="store_true")
    add_graph_arguments(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter-dir", default=None, help="where to write the adapters")
    parser.add_argument("--out", default=None, help="append the JSON record to this file")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of the no-adapter and the warm run (medians reported)")
    return parser


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def random_workload(rng: random.Random, vocab: int, num_prompts: int, input_len: int,
                    request_rate: float) -> tuple[list[list[int]], list[float]]:
    """Random prompts of input_len tokens and their arrival times (all at 0 for rate inf,
    else a Poisson process)."""
    prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num_prompts)]
    arrivals, t = [], 0.0
    for _ in prompts:
        arrivals.append(t)
        if request_rate != float("inf"):
            t += rng.expovariate(request_rate)
    return prompts, arrivals


def engine_fields(engine) -> dict:
    """The fields every benchmark record names its machine with."""
    import torch

    on_gpu = engine.device.type == "cuda"
    return {"device": str(engine.device),
            "device_name": torch.cuda.get_device_name(engine.device) if on_gpu else "cpu",
            "dtype": str(engine.dtype).removeprefix("torch.")}


def save_record(record: dict, out: str | None) -> None:
    """Appends the record as one JSON line to `out` (when given)."""
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def _median_run(runs: list[dict]) -> dict:
    """Per-field median of several runs' summaries (failed requests: summed)."""
    merged = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    merged["failed"] = sum(run["failed"] for run in runs)
    return merged


def _spread(runs: list[dict]) -> list[dict]:
    return [{"tpot_p50_ms": run["tpot_p50_ms"], "output_tokens_per_s": run["output_tokens_per_s"]}
            for run in runs]


def _run(engine, prompts, loras, params, arrivals) -> dict:
    start = time.perf_counter()
    pending = list(range(len(prompts)))
    done = {}
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and arrivals[pending[0]] <= now:
            i = pending.pop(0)
            engine.add_request(f"b{i}-{id(prompts)}", {"prompt_token_ids": prompts[i]}, params,
                               loras[i])
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[pending[0]] - now))
            continue
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    elapsed = time.perf_counter() - start
    outs = list(done.values())
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.ttft for o in outs if o.metrics.ttft is not None]
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) /
            max(1, len(o.outputs[0].token_ids) - 1) for o in outs
            if o.metrics.first_token_time is not None and o.metrics.finished_time is not None]
    return {"duration_s": elapsed, "output_tokens_per_s": generated / elapsed,
            "ttft_p50_ms": 1e3 * _percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * _percentile(ttft, 0.99),
            "tpot_p50_ms": 1e3 * _percentile(tpot, 0.5), "tpot_p99_ms": 1e3 * _percentile(tpot, 0.99),
            "failed": sum(o.outputs[0].finish_reason == "error" for o in outs)}


def run_from_args(args) -> int:
    from moelora import LoRARequest, SamplingParams
    from moelora.bench.synthetic_adapters import write_random_adapter
    from moelora.distributed import executor_for
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    rng = random.Random(args.seed)
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          enable_lora=True, max_lora_rank=args.rank, max_loras=args.max_loras,
                          max_cpu_loras=max(args.max_loras, args.num_adapters),
                          max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
                          load_progress=False, synthetic_num_layers=args.num_layers,
                          tensor_parallel_size=args.tensor_parallel_size,
                          enable_expert_parallel=args.enable_expert_parallel,
                          decode_graphs=graphs_choice(args))
    engine = LLMEngine(config, executor_for(config))
    vocab = engine.model.config.vocab_size
    adapter_dir = args.adapter_dir or tempfile.mkdtemp(prefix="moelora-bench-adapters-")
    # Adapters have the whole model's shapes; a parallel engine's model is this rank's shard.
    sites = engine.executor.full_sites
    loras = [LoRARequest(f"a{i}", i + 1, write_random_adapter(
        os.path.join(adapter_dir, f"a{i}"), sites, args.rank, seed=args.seed + i))
        for i in range(args.num_adapters)]
    weights = [1.0 / (i + 1) if args.popularity == "zipf" else 1.0 for i in range(len(loras))]
    prompts, arrivals = random_workload(rng, vocab, args.num_prompts, args.input_len,
                                        args.request_rate)
    chosen = [rng.choices(loras, weights)[0] for _ in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    plain = [None] * len(prompts)
    try:
        _run(engine, prompts, plain, params, arrivals)  # warm-up: this workload's shapes
        before = engine.adapters.stats()
        with_adapters = _run(engine, prompts, chosen, params, arrivals)
        after = engine.adapters.stats()
        base_runs, warm_runs = [], []
        for _ in range(args.repeats):  # interleaved, so drift affects both alike
            base_runs.append(_run(engine, prompts, plain, params, arrivals))
            warm_runs.append(_run(engine, prompts, chosen, params, arrivals))
        after_warm = engine.adapters.stats()
        pool = engine.memory.pool.stats()
    finally:
        engine.stop()  # also ends the other ranks of a parallel engine
    base, warm = _median_run(base_runs), _median_run(warm_runs)
    loaded = after["bytes_loaded"] - before["bytes_loaded"]
    seconds = after["load_seconds"] - before["load_seconds"]
    record = {
        "bench": "offline", "model": args.model, **engine_fields(engine),
        "num_adapters": args.num_adapters, "rank": args.rank, "max_loras": args.max_loras,
        "popularity": args.popularity, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len,
        "request_rate": args.request_rate, "tensor_parallel_size": args.tensor_parallel_size,
        "enable_expert_parallel": args.enable_expert_parallel,
        "decode_graphs": engine.runner.graphs is not None,
        "decode_graph_replays": (engine.runner.graphs.replays
                                 if engine.runner.graphs is not None else 0),
        "with_adapters": with_adapters, "no_adapters": base, "with_adapters_warm": warm,
        "repeats": args.repeats, "no_adapters_rounds": _spread(base_runs),
        "with_adapters_warm_rounds": _spread(warm_runs),
        "throughput_ratio": with_adapters["output_tokens_per_s"] / base["output_tokens_per_s"],
        "throughput_ratio_warm": warm["output_tokens_per_s"] / base["output_tokens_per_s"],
        "warm_adapter_loads": after_warm["device_loads"] - after["device_loads"],
        "adapter_loads": after["device_loads"] - before["device_loads"],
        "adapter_evictions": after["device_evictions"] - before["device_evictions"],
        "adapter_load_gbps": loaded / seconds / 1e9 if seconds > 0 else None,
        "pool": pool,
    }
    print(json.dumps(record, indent=1))
    save_record(record, args.out)
    return 0


def main(argv=None) -> int:
    return run_from_args(add_cli_args(argparse.ArgumentParser(description=__doc__)).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
