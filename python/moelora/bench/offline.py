"""`moelora bench offline`: end-to-end offline throughput with many adapters.

One workload (random prompts of --input-len tokens, --output-len generated tokens each with
ignore_eos, arrivals all at once or Poisson at --request-rate) runs several times in one process:
first once with no adapters as a warm-up (the engine meets this workload's batch shapes: decode
graphs captured, allocator pools grown), discarded; then with adapters (--num-adapters random
rank --rank adapters on attention and experts, popularity uniform or zipf, --max-loras resident
at once), which starts cold, every adapter read from disk when first asked for; then --repeats
rounds of the same requests with no adapters and again with adapters (warm: whatever the runs
before left resident; with more adapters than --max-loras, loads and evictions continue),
interleaved so that drift affects both alike.

Prints a table (no adapters, cold, warm; one line per adapter of the warm run) and saves one JSON
record: output tokens/s, TTFT and TPOT p50/p99 of the cold run and the per-field medians of the
rounds (each round's TPOT p50 and tokens/s listed too, to show the spread), per-adapter results,
adapter loads and their bandwidth, pool pages by kind, the ratios to the no-adapter runs, and
the cold run against its bound (`cold_bound`): the longer of the warm run and a plain parallel
read of the adapter files the run used, the page cache as the cold run left it. Where the cold
run's time goes: when each of its adapters became ready on the device (`adapter_timeline`) and,
for it and the warm rounds, a step profile (`step_profile`: steps, seconds, and those run by
under half of --max-num-seqs, the tail that requests starting spread out leave; the first and
the longest step; with --step-trace, every step of the cold run) and the time spent queueing
requests (`add_request_s`: a first request for an adapter registers it).
The model's memory is estimated before it is built; one that cannot fit is refused with the
numbers and the flag to change.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics

from moelora.bench import flags
from moelora.bench.adapters import plain_parallel_read
from moelora.bench.records import append_record, dumps, engine_fields, format_table, pyplot
from moelora.bench.workload import (
    AdapterTimeline,
    StepProfile,
    per_adapter,
    popularity_weights,
    random_workload,
    run_requests,
)

READ_THREADS = 4  # the plain read's threads, as the engine's adapter_load_threads default


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    flags.describe(parser, __doc__)
    parser.add_argument("--model", default="synthetic:tiny-moe",
                        help="synthetic:<preset> or a model directory")
    parser.add_argument("--num-layers", type=flags.positive_int, default=None,
                        help="build only this many layers of a synthetic model")
    parser.add_argument("--num-adapters", type=flags.positive_int, default=8,
                        help="random adapters the requests are spread over")
    parser.add_argument("--rank", type=flags.positive_int, default=16, help="adapter rank")
    parser.add_argument("--max-loras", type=flags.positive_int, default=4,
                        help="adapters resident on the device at once")
    parser.add_argument("--popularity", choices=["uniform", "zipf"], default="zipf",
                        help="how requests pick their adapter")
    parser.add_argument("--num-prompts", type=flags.positive_int, default=64,
                        help="requests per run")
    parser.add_argument("--input-len", type=flags.positive_int, default=64,
                        help="prompt tokens per request")
    parser.add_argument("--output-len", type=flags.positive_int, default=32,
                        help="generated tokens per request (ignore_eos)")
    parser.add_argument("--request-rate", type=flags.rate, default=float("inf"),
                        help="Poisson arrivals per second (inf: all at once)")
    parser.add_argument("--max-num-seqs", type=flags.positive_int, default=64,
                        help="sequences decoding together at most")
    parser.add_argument("--max-num-batched-tokens", type=flags.positive_int, default=2048,
                        help="prefill chunk budget per step")
    parser.add_argument("--tensor-parallel-size", type=flags.positive_int, default=1,
                        help="processes, one per GPU (moelora.distributed)")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="partition the experts over the tensor-parallel processes")
    flags.add_graph_arguments(parser)
    flags.add_engine_placement_arguments(parser)
    parser.add_argument("--out", default=None, help="append the JSON record to this file")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of the no-adapter and the warm run (medians reported)")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                        help="draw the warm run's per-adapter results")
    parser.add_argument("--step-trace", action="store_true",
                        help="save every step of the cold run in its step profile (start, "
                             "seconds, running and waiting sequences, adapters on the device, "
                             "CUDA allocator calls)")
    flags.add_host_block_argument(parser)
    flags.add_host_reserve_argument(parser)
    flags.add_memory_check_argument(parser)
    return parser


def _median_fields(runs: list[dict]) -> dict:
    """Per-field median of several runs' summaries, nested summaries field by field."""
    return {key: (_median_fields([run[key] for run in runs]) if isinstance(runs[0][key], dict)
                  else statistics.median(run[key] for run in runs)) for key in runs[0]}


def _median_run(runs: list[dict]) -> dict:
    """Per-field median of several runs' summaries (failed requests: summed)."""
    merged = _median_fields(runs)
    merged["failed"] = sum(run["failed"] for run in runs)
    return merged


def _spread(runs: list[dict]) -> list[dict]:
    return [{"tpot_p50_ms": run["tpot_p50_ms"], "output_tokens_per_s": run["output_tokens_per_s"]}
            for run in runs]


_RUN_COLUMNS = [("run", "run"), ("output_tokens_per_s", "out tok/s"), ("ratio", "vs none"),
                ("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"),
                ("tpot_p50_ms", "TPOT p50"), ("tpot_p99_ms", "TPOT p99"), ("failed", "failed")]
_ADAPTER_COLUMNS = [("adapter", "adapter"), ("requests", "requests"),
                    ("output_tokens_per_s", "out tok/s"), ("ttft_p50_ms", "TTFT p50"),
                    ("tpot_p50_ms", "TPOT p50"), ("failed", "failed")]


def cold_bound(record: dict) -> dict:
    """The cold run against what it could at best be: no shorter than the warm run, and no
    shorter than a plain parallel read of the adapter files it used."""
    cold, warm = record["with_adapters"], record["with_adapters_warm"]
    floor_s = max(warm["duration_s"], cold["plain_read_s"])
    return {"plain_read_s": cold["plain_read_s"],
            "plain_read_gbps": cold["adapter_file_bytes"] / cold["plain_read_s"] / 1e9,
            "bound_s": floor_s, "duration_s": cold["duration_s"],
            "ratio_to_bound": floor_s / cold["duration_s"]}


def print_tables(record: dict) -> None:
    base = record["no_adapters"]["output_tokens_per_s"]
    rows = [{"run": name, **record[key], "ratio": record[key]["output_tokens_per_s"] / base}
            for name, key in (("no adapters", "no_adapters"), ("adapters, cold", "with_adapters"),
                              ("adapters, warm", "with_adapters_warm"))]
    print(format_table(_RUN_COLUMNS, rows))
    bound = record["cold_bound"]
    print(f"\ncold run {bound['duration_s']:.2f} s; its bound {bound['bound_s']:.2f} s (the warm "
          f"run, or a plain read of its adapters' files: {bound['plain_read_s']:.2f} s at "
          f"{bound['plain_read_gbps']:.2f} GB/s): {bound['ratio_to_bound']:.2f} of the best")
    t = record["with_adapters"]["adapter_timeline"]
    if t["adapters_ready"]:
        print(f"cold run's adapters ready on the device: first {t['first_ready_s']:.3f} s, median "
              f"{t['median_ready_s']:.3f} s, last {t['last_ready_s']:.3f} s (step "
              f"{t['steps_to_last_ready']}); a load's mean disk -> host "
              f"{t['host_load_ms_mean']:.1f} ms, host -> device {t['device_load_ms_mean']:.1f} ms")
    cold = record["with_adapters"]["step_profile"]
    warm = record["with_adapters_warm"]["step_profile"]
    print(f"steps run by under half the batch: cold {cold['steps_below_half_batch']} of "
          f"{cold['steps']} ({cold['seconds_below_half_batch']:.2f} s), warm "
          f"{warm['steps_below_half_batch']:g} of {warm['steps']:g} "
          f"({warm['seconds_below_half_batch']:.2f} s); first step cold "
          f"{cold['first_step_s']:.3f} s, warm {warm['first_step_s']:.3f} s")
    print(f"requests queued (their adapters registered on first use): cold "
          f"{record['with_adapters']['add_request_s']:.3f} s (registering "
          f"{t['registration_s']:.3f} s), warm {record['with_adapters_warm']['add_request_s']:.3f} s")
    print("\nper adapter (warm run, last round):")
    print(format_table(_ADAPTER_COLUMNS, [{"adapter": name, **values} for name, values in
                                          record["per_adapter_warm"].items()]))


def _check_memory(args) -> None:
    """Refuses a model that cannot fit before building it (one-process engines)."""
    import torch

    from moelora.bench.memory_check import check_model_fits, engine_dtype, model_config_of
    from moelora.bench.weight_bytes import adapter_bytes, kv_bytes_per_token

    if args.skip_memory_check or args.tensor_parallel_size > 1:
        return
    config = model_config_of(args.model, args.num_layers)
    elem = torch.tensor([], dtype=engine_dtype(args.model, args.dtype, args.device)).element_size()
    tokens = min(args.max_num_seqs, args.num_prompts) * (args.input_len + args.output_len)
    extra = (min(args.max_loras, args.num_adapters) * adapter_bytes(config, args.rank, elem)
             + tokens * config.num_layers * kv_bytes_per_token(config, elem))
    check_model_fits(args.model, args.num_layers, args.dtype, args.device, extra_bytes=extra)


def _measure(engine, args, adapter_dir: str, rng: random.Random) -> dict:
    """Warm-up, the cold run with adapters, then the interleaved rounds (see the module doc)."""
    from moelora import LoRARequest, SamplingParams
    from moelora.bench.synthetic_adapters import write_adapters

    vocab = engine.model.config.vocab_size
    # Adapters have the whole model's shapes; a parallel engine's model is this rank's shard.
    sites = engine.executor.full_sites
    paths = write_adapters(adapter_dir, args.num_adapters, sites, args.rank, seed=args.seed,
                           device=engine.device if args.tensor_parallel_size == 1 else "cpu")
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(paths)]
    weights = popularity_weights(len(loras), args.popularity)
    prompts, arrivals = random_workload(rng, vocab, args.num_prompts, args.input_len,
                                        args.request_rate)
    chosen = [rng.choices(loras, weights)[0] for _ in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    plain = [None] * len(prompts)
    run_requests(engine, prompts, plain, params, arrivals)  # warm-up: this workload's shapes
    before = engine.adapters.stats()
    timeline = AdapterTimeline(engine, sorted(set(chosen), key=lambda lora: lora.lora_name))
    profile = StepProfile(engine, args.max_num_seqs, timeline.step, trace=args.step_trace)
    with_adapters, cold_outs = run_requests(engine, prompts, chosen, params, arrivals,
                                            step=profile.step)
    with_adapters["step_profile"] = profile.summary()
    after = engine.adapters.stats()
    loads = max(1, after["device_loads"] - before["device_loads"])
    with_adapters["adapter_timeline"] = {
        **timeline.summary(),
        "host_load_ms_mean": 1e3 * (after["host_load_seconds"] - before["host_load_seconds"])
        / loads,
        "device_load_ms_mean": 1e3 * (after["load_seconds"] - before["load_seconds"]) / loads,
        # host blocks page-locked ahead (the reserve) when the cold run began: loads that find
        # none lock their own beside the reads
        "reserve_blocks_at_start": before["host_reserve_blocks_made"],
        # of add_request_s: the adapters' registration (plan and native), the rest is queueing
        "registration_s": after["registration_seconds"] - before["registration_seconds"]}
    # The cold run's floor: its adapters' files read plainly (page cache as the run found it)
    used = sorted({os.path.join(lora.lora_path, "adapter_model.safetensors") for lora in chosen})
    with_adapters["adapter_file_bytes"] = sum(os.path.getsize(path) for path in used)
    with_adapters["plain_read_s"] = plain_parallel_read(used, READ_THREADS)
    base_runs, warm_runs = [], []
    for _ in range(args.repeats):  # interleaved, so drift affects both alike
        base_runs.append(run_requests(engine, prompts, plain, params, arrivals)[0])
        profile = StepProfile(engine, args.max_num_seqs)
        warm, warm_outs = run_requests(engine, prompts, chosen, params, arrivals,
                                       step=profile.step)
        warm["step_profile"] = profile.summary()
        warm_runs.append(warm)
    return {"before": before, "after": after, "after_warm": engine.adapters.stats(),
            "pool": engine.memory.pool.stats(), "with_adapters": with_adapters,
            "cold_outs": cold_outs, "warm_outs": warm_outs, "base_runs": base_runs,
            "warm_runs": warm_runs}


def run_from_args(args) -> int:
    from moelora.bench.synthetic_adapters import adapter_directory
    from moelora.distributed import executor_for
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if args.plot is not None:
        pyplot()  # before the run: a missing matplotlib stops it with its pip line
    _check_memory(args)
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          enable_lora=True, max_lora_rank=args.rank, max_loras=args.max_loras,
                          max_cpu_loras=max(args.max_loras, args.num_adapters),
                          max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
                          load_progress=False, synthetic_num_layers=args.num_layers,
                          tensor_parallel_size=args.tensor_parallel_size,
                          enable_expert_parallel=args.enable_expert_parallel,
                          **flags.graph_options(args),
                          adapter_host_block_bytes=flags.host_block_bytes(args),
                          adapter_host_reserve_bytes=flags.host_reserve_bytes(args))
    engine = LLMEngine(config, executor_for(config))
    try:
        with adapter_directory(args.adapter_dir, "moelora-bench-adapters-") as adapter_dir:
            runs = _measure(engine, args, adapter_dir, random.Random(args.seed))
        # read before stop(), which releases the model
        engine_info = {**engine_fields(engine), "num_layers": engine.model.config.num_layers}
        graphs = engine.runner.graphs
        graph_info = {"decode_graphs": graphs is not None,
                      "decode_graph_replays": graphs.replays if graphs is not None else 0}
    finally:
        engine.stop()  # also ends the other ranks of a parallel engine
    base_runs, warm_runs = runs["base_runs"], runs["warm_runs"]
    before, after, after_warm = runs["before"], runs["after"], runs["after_warm"]
    with_adapters, pool = runs["with_adapters"], runs["pool"]
    cold_outs, warm_outs = runs["cold_outs"], runs["warm_outs"]
    base, warm = _median_run(base_runs), _median_run(warm_runs)
    loaded = after["bytes_loaded"] - before["bytes_loaded"]
    seconds = after["load_seconds"] - before["load_seconds"]
    record = {
        "bench": "offline", "model": args.model, **engine_info,
        "num_adapters": args.num_adapters, "rank": args.rank, "max_loras": args.max_loras,
        "popularity": args.popularity, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len,
        "request_rate": args.request_rate, "tensor_parallel_size": args.tensor_parallel_size,
        "enable_expert_parallel": args.enable_expert_parallel,
        "host_block_bytes": flags.host_block_bytes(args),
        "host_reserve_mb": args.host_reserve_mb,
        **graph_info,
        "with_adapters": with_adapters, "no_adapters": base, "with_adapters_warm": warm,
        "repeats": args.repeats, "no_adapters_rounds": _spread(base_runs),
        "with_adapters_warm_rounds": _spread(warm_runs),
        "throughput_ratio": with_adapters["output_tokens_per_s"] / base["output_tokens_per_s"],
        "throughput_ratio_warm": warm["output_tokens_per_s"] / base["output_tokens_per_s"],
        "warm_adapter_loads": after_warm["device_loads"] - after["device_loads"],
        "adapter_loads": after["device_loads"] - before["device_loads"],
        "adapter_evictions": after["device_evictions"] - before["device_evictions"],
        "adapter_load_gbps": loaded / seconds / 1e9 if seconds > 0 else None,
        "per_adapter_cold": per_adapter(cold_outs, with_adapters["duration_s"]),
        "per_adapter_warm": per_adapter(warm_outs, warm_runs[-1]["duration_s"]),
        "pool": pool,
    }
    record["cold_bound"] = cold_bound(record)
    print_tables(record)
    print(dumps(record))
    append_record(record, args.out)
    if args.plot is not None:
        from moelora.bench.plots import plot_per_adapter

        target = args.plot or os.path.splitext(args.out or "bench-offline")[0] + "-adapters.png"
        title = (f"{args.model}: {args.num_adapters} adapters ({args.popularity}), warm run, "
                 f"{record['device_name']}")
        print(f"plot saved to {plot_per_adapter(record['per_adapter_warm'], target, title)}")
    return 0


def main(argv=None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="moelora bench offline"))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
