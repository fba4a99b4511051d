"""`moelora bench scale`: throughput as the number of adapters grows past what the GPU holds.

S-LoRA's claim to beat: serving 2000 adapters costs under 10% of the throughput of serving 5.
One engine (one process) runs the same workload (random prompts, ignore_eos) with no adapters
and then, for every popularity (uniform, zipf) and arrival setting (all at once, or Poisson at a
rate), once per adapter count in --adapter-counts: each request draws its adapter from that many
random adapters, with --max-loras device slots and --max-cpu-loras host copies, so adapters
stream from disk to host to GPU while requests run. Every point starts cold: its adapters are
registered before the run (as a server's --lora-modules are) and unregistered after it. With
--warm-host their host copies are read before the clock starts (S-LoRA's setting: adapters in
host memory), so only host -> device copies run with the requests.

--request-rate takes numbers, inf (all at once) and auto: a Poisson rate of --auto-rate-fraction
of the request throughput the no-adapter run reached all at once, so the GPU is busy but not
flooded. With a synthetic model and no --num-layers, the model keeps as many of its first layers
as let the largest count of adapters fit --adapter-disk-budget-gb.

Prints a table and one JSON record: per point, output tokens/s, request throughput, TTFT/TPOT
p50/p99, device loads and evictions, and the throughput relative to the fewest adapters at the
same popularity and rate (relative_to_fewest) and to no adapters at the same rate. With
--results-dir, also writes the record, a markdown table with the command that made it, and the
plot into that folder (scale_report.py).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil

from moelora.bench import flags
from moelora.bench.records import append_record, dumps, engine_fields, format_table, pyplot

GB = 1e9
TABLE = [("popularity", "popularity"), ("request_rate", "rate"), ("num_adapters", "adapters"),
         ("output_tokens_per_s", "out tok/s"), ("requests_per_s", "req/s"),
         ("ttft_p50_ms", "TTFT p50 ms"), ("tpot_p50_ms", "TPOT p50 ms"),
         ("device_loads", "loads"), ("device_evictions", "evictions"),
         ("mean_running", "mean running"), ("steps", "steps"),
         ("steps_short_for_adapters", "short for adapters"), ("steps_empty", "empty"),
         ("step_ms_median", "step ms p50"), ("step_ms_mean", "mean"), ("step_ms_max", "max"),
         ("relative_to_fewest", "vs fewest"), ("relative_to_no_adapters", "vs none")]


def rate_or_auto(text: str):
    return "auto" if text == "auto" else flags.rate(text)


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    flags.describe(parser, __doc__)
    parser.add_argument("--model", default="synthetic:tiny-moe",
                        help="synthetic:<preset> or a model directory")
    parser.add_argument("--num-layers", type=flags.positive_int, default=None,
                        help="synthetic models: build this many layers (default: as many as "
                             "let the adapters fit the disk budget)")
    parser.add_argument("--adapter-counts", nargs="+", type=flags.positive_int,
                        default=[8, 64, 512], help="adapter counts, one point each")
    parser.add_argument("--rank", type=flags.positive_int, default=16, help="adapter rank")
    parser.add_argument("--weights", choices=flags.WEIGHT_CHOICES, default="bf16",
                        help="how the experts are stored (synthetic models; falls back to bf16 "
                             "with a note when this build has no such option)")
    parser.add_argument("--max-loras", type=flags.positive_int, default=64,
                        help="device slots a step may use")
    parser.add_argument("--lora-prefetch-slots", type=int, default=0,
                        help="device slots beyond --max-loras that adapters load into while a "
                             "step runs")
    parser.add_argument("--max-cpu-loras", type=flags.positive_int, default=128,
                        help="host copies kept")
    parser.add_argument("--popularity", nargs="+", choices=["uniform", "zipf"],
                        default=["uniform", "zipf"], help="how requests pick their adapter")
    parser.add_argument("--request-rate", nargs="+", type=rate_or_auto, default=[math.inf, "auto"],
                        help="Poisson arrivals per second; inf: all at once; auto: see above")
    parser.add_argument("--auto-rate-fraction", type=float, default=0.75,
                        help="the auto rate as a fraction of the no-adapter request throughput")
    parser.add_argument("--num-prompts", type=flags.positive_int, default=512,
                        help="requests per point")
    parser.add_argument("--input-len", type=flags.positive_int, default=32,
                        help="prompt tokens per request")
    parser.add_argument("--output-len", type=flags.positive_int, default=32,
                        help="generated tokens per request (ignore_eos)")
    parser.add_argument("--warm-host", action="store_true",
                        help="read each point's adapters (up to --max-cpu-loras of them) into "
                             "host memory before its clock starts, as S-LoRA measures; the "
                             "device still starts cold")
    parser.add_argument("--max-num-seqs", type=flags.positive_int, default=64,
                        help="sequences decoding together at most")
    parser.add_argument("--max-num-batched-tokens", type=flags.positive_int, default=2048,
                        help="prefill chunk budget per step")
    flags.add_graph_arguments(parser)
    flags.add_engine_placement_arguments(parser)
    parser.add_argument("--adapter-disk-budget-gb", type=float, default=16.0,
                        help="disk the adapters may take when the layer count is chosen")
    parser.add_argument("--out", default=None, help="append the JSON record to this file")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                        help="draw throughput and TTFT against the adapter count")
    parser.add_argument("--results-dir", default=None,
                        help="write NAME.jsonl (record appended), NAME.md (table and command) "
                             "and NAME.png (plot) into this folder")
    parser.add_argument("--results-name", default=None,
                        help="NAME of the results files (default: <card>-scale, e.g. h100-scale)")
    flags.add_memory_check_argument(parser)
    return parser


def choose_layers(args, adapter_dir: str) -> int | None:
    """--num-layers, or for a synthetic model the most first layers whose adapters (the largest
    count) fit the disk budget and the free disk."""
    from moelora.bench.memory_check import engine_dtype, model_config_of
    from moelora.bench.weight_bytes import adapter_bytes

    if not args.model.startswith("synthetic:"):
        return args.num_layers
    import torch

    elem = torch.tensor([], dtype=engine_dtype(args.model, args.dtype, args.device)).element_size()
    full = model_config_of(args.model)
    per_layer = adapter_bytes(full.with_num_layers(1), args.rank, elem)
    free = 0.9 * shutil.disk_usage(adapter_dir).free + _written_bytes(adapter_dir)
    if args.num_layers is not None:
        total = max(args.adapter_counts) * min(args.num_layers, full.num_layers) * per_layer
        if total > free:
            raise SystemExit(f"{max(args.adapter_counts)} adapters of {args.num_layers} layers "
                             f"take {total / GB:.1f} GB, more than the disk at {adapter_dir} "
                             f"has free ({free / GB:.1f} GB): fewer --num-layers, or another "
                             f"--adapter-dir")
        return args.num_layers
    budget = min(args.adapter_disk_budget_gb * GB, 0.8 * free)
    layers = min(full.num_layers, int(budget // (max(args.adapter_counts) * per_layer)))
    if layers < 1:
        raise SystemExit(f"{max(args.adapter_counts)} adapters of one layer take "
                         f"{max(args.adapter_counts) * per_layer / GB:.1f} GB, over the disk "
                         f"budget of {budget / GB:.1f} GB (--adapter-disk-budget-gb, free disk at "
                         f"{adapter_dir})")
    if layers < full.num_layers:
        total = max(args.adapter_counts) * layers * per_layer
        print(f"{args.model}: the first {layers} of {full.num_layers} layers, so that "
              f"{max(args.adapter_counts)} adapters take {total / GB:.1f} GB of disk")
    return layers


def _written_bytes(adapter_dir: str) -> int:
    """Bytes of adapter files already in `adapter_dir` (reused, so they need no new room)."""
    total = 0
    for root, _, files in os.walk(adapter_dir):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _check_memory(args, layers: int | None) -> None:
    import torch

    from moelora.bench.memory_check import check_model_fits, engine_dtype, model_config_of
    from moelora.bench.weight_bytes import adapter_bytes, kv_bytes_per_token

    if args.skip_memory_check:
        return
    config = model_config_of(args.model, layers)
    elem = torch.tensor([], dtype=engine_dtype(args.model, args.dtype, args.device)).element_size()
    tokens = min(args.max_num_seqs, args.num_prompts) * (args.input_len + args.output_len)
    slots = args.max_loras + args.lora_prefetch_slots
    extra = (min(slots, max(args.adapter_counts)) * adapter_bytes(config, args.rank, elem)
             + tokens * config.num_layers * kv_bytes_per_token(config, elem))
    check_model_fits(args.model, layers, args.dtype, args.device, args.weights_built,
                     extra_bytes=extra)


def build_engine(args, layers: int | None):
    from moelora.bench.engine_options import weights_options
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, enable_lora=True,
        max_lora_rank=args.rank, max_loras=args.max_loras,
        lora_prefetch_slots=args.lora_prefetch_slots,
        max_cpu_loras=max(args.max_cpu_loras, args.max_loras + args.lora_prefetch_slots),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
        load_progress=False, synthetic_num_layers=layers,
        **flags.graph_options(args), **weights_options(args.weights_built)))


def run_from_args(args) -> int:
    from moelora.bench.engine_options import weights_options
    from moelora.bench.scale_points import ScalePoints
    from moelora.bench.synthetic_adapters import adapter_directory

    if not 0 < args.auto_rate_fraction:
        raise SystemExit(f"--auto-rate-fraction must be > 0, got {args.auto_rate_fraction}")
    if args.plot is not None or args.results_dir is not None:
        pyplot()  # before the run: a missing matplotlib stops it with its pip line
    args.weights_built = args.weights if weights_options(args.weights) is not None else "bf16"
    notes = []
    if args.weights_built != args.weights:
        notes.append(f"this build has no option for {args.weights} experts: they were built "
                     f"unquantized, in the model dtype")
        print(f"note: {notes[-1]}")
    with adapter_directory(args.adapter_dir, "moelora-bench-scale-") as adapter_dir:
        layers = choose_layers(args, adapter_dir)
        _check_memory(args, layers)
        engine = build_engine(args, layers)
        try:
            points = ScalePoints(engine, args, adapter_dir, random.Random(args.seed))
            base, results = points.measure()
            # read before stop(), which releases the model
            engine_info = {**engine_fields(engine), "num_layers": engine.model.config.num_layers}
        finally:
            engine.stop()
    record = {
        "bench": "scale", "model": args.model, **engine_info, "rank": args.rank,
        "weights": args.weights_built, "notes": notes,
        "max_loras": args.max_loras, "lora_prefetch_slots": args.lora_prefetch_slots,
        "max_cpu_loras": args.max_cpu_loras,
        "warm_host": args.warm_host,
        "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "adapter_counts": sorted(set(args.adapter_counts)),
        "no_adapters": base, "points": results,
        "max_drop": 1.0 - min((r["relative_to_fewest"] for r in results
                               if r["relative_to_fewest"] is not None), default=1.0),
    }
    rows = [{"popularity": "none", "num_adapters": 0, **b} for b in base] + results
    print(format_table(TABLE, rows))
    print(dumps(record))
    append_record(record, args.out)
    if args.results_dir is not None:
        from moelora.bench.scale_report import command_of, write_results

        command = command_of(args, add_cli_args(argparse.ArgumentParser()), "moelora bench scale")
        paths = write_results(record, TABLE, rows, command, args.results_dir, args.results_name)
        print("results: " + ", ".join(paths.values()))
    if args.plot is not None:
        from moelora.bench.plots import plot_scale

        target = args.plot or os.path.splitext(args.out or "bench-scale")[0] + "-scale.png"
        print(f"plot saved to {plot_scale(record, target)}")
    return 0 if all(r["failed"] == 0 for r in results) else 1


def main(argv=None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="moelora bench scale"))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
