"""`moelora bench latency`: the decode step as users compare it, against its roofline.

One engine (one process, LoRA enabled) serves a batch of --num-seqs sequences at once (random
prompts of --input-len tokens, --output-len generated tokens each, ignore_eos) with 0 adapters
and with each count in --num-adapters (rank --rank adapters on attention and every expert,
sequence i using adapter i mod N, all loaded before timing: warm). Per batch size: one warm-up
run per adapter count, then --rounds rounds of every count, interleaved, so drift affects them
alike; figures are medians over the rounds.

Per (sequences, adapters) it prints a table row and appends one JSON line to --out with:
  step_wall_ms   host wall time of one engine.step() at steady state (pure decode steps that run
                 the whole batch), median over those steps, then over rounds;
  step_gpu_ms    GPU time of the same steps: CUDA events from the model run's start (graph
                 replay or eager forward) to the LM head's logits;
  kernels_per_step  GPU kernels one steady decode step launches (torch.profiler; the decode
                 graph's kernels when graphs are on), memcpy/memset counted apart;
  roofline_ms    the bytes the step must read (weights as stored, the routed experts the step
                 really selected, counted from its routing; the KV it attends over at the mean
                 context of the run; adapters' A/B of the (adapter, expert) pairs it touched)
                 over the card's copy rate (weight_bytes.py); roofline_ratio = wall / roofline;
  output_tokens_per_s, ttft_ms and tpot_ms (p50, p99) of the run, and ratio_to_no_adapters
                 (output tokens/s against the 0-adapter runs of the same batch size).
GPU time, kernel counts and the roofline need a CUDA device (null on the CPU; --copy-rate gives
a roofline anywhere). --plot draws the table.
"""

from __future__ import annotations

import argparse
import os
import random

from moelora.bench import flags
from moelora.bench.records import append_record, format_table, pyplot, ratio

DEFAULT_OUT = os.path.join("bench", "results", "e2e.jsonl")
TABLE = [("num_seqs", "seqs"), ("num_adapters", "adapters"), ("step_wall_ms", "wall ms"),
         ("step_gpu_ms", "GPU ms"), ("roofline_ms", "roofline ms"),
         ("roofline_ratio", "wall/roof"), ("kernels_per_step", "kernels"),
         ("output_tokens_per_s", "out tok/s"), ("ratio_to_no_adapters", "vs none"),
         ("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"), ("tpot_p50_ms", "TPOT p50"),
         ("tpot_p99_ms", "TPOT p99")]


def layer_choices(text: str) -> list[int]:
    """"24" or "48,24": layer counts to try in order, the first that fits memory is built."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or N1,N2,..., got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"layer counts must be >= 1, got {text!r}")
    return values


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    flags.describe(parser, __doc__)
    parser.add_argument("--model", default="synthetic:tiny-moe",
                        help="synthetic:<preset> or a model directory")
    parser.add_argument("--num-layers", type=layer_choices, default=None,
                        help="synthetic models: build this many layers; N1,N2,... builds the "
                             "first count that fits the device's memory (all layers if unset)")
    parser.add_argument("--weights", choices=flags.WEIGHT_CHOICES, default="bf16",
                        help="how the experts are stored (synthetic models; falls back to bf16 "
                             "with a note when this build has no such option)")
    parser.add_argument("--num-seqs", type=flags.positive_int, nargs="+", default=[1, 16, 64],
                        help="batch sizes: sequences decoding together")
    parser.add_argument("--num-adapters", type=int, nargs="+", default=[0, 1, 16],
                        help="adapter counts to compare (0, the baseline, always runs)")
    parser.add_argument("--rank", type=flags.positive_int, default=16, help="adapter rank")
    parser.add_argument("--input-len", type=flags.positive_int, default=128,
                        help="prompt tokens per sequence")
    parser.add_argument("--output-len", type=flags.positive_int, default=128,
                        help="generated tokens per sequence (ignore_eos)")
    parser.add_argument("--rounds", type=flags.positive_int, default=3,
                        help="timed rounds of every adapter count (medians reported)")
    parser.add_argument("--max-num-batched-tokens", type=flags.positive_int, default=2048,
                        help="prefill chunk budget per step")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                        help="fraction of the GPU the engine may use")
    flags.add_graph_arguments(parser)
    flags.add_engine_placement_arguments(parser)
    parser.add_argument("--copy-rate", type=float, default=None,
                        help="bytes/s for the roofline (default: the measured rate of the card: "
                             "H100 80GB 3.0e12, H200 4.18e12)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="append one JSON line per (sequences, adapters) here ('-': none)")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                        help="draw step times and throughput (default file: next to --out)")
    parser.add_argument("--note", default=None, help="a note saved in every record")
    flags.add_memory_check_argument(parser)
    return parser


def _validate(args) -> None:
    """Checks the flags; sets args.weights_built (bf16 when this build cannot store the experts
    as asked)."""
    from moelora.bench.engine_options import weights_options

    if min(args.num_adapters) < 0:
        raise SystemExit(f"--num-adapters must be >= 0, got {args.num_adapters}")
    if args.copy_rate is not None and args.copy_rate <= 0:
        raise SystemExit(f"--copy-rate must be > 0 bytes/s, got {args.copy_rate}")
    args.num_adapters = sorted(set(args.num_adapters) | {0})
    args.num_seqs = sorted(set(args.num_seqs))
    args.weights_built = args.weights if weights_options(args.weights) is not None else "bf16"


def _pick_layers(args, notes: list[str]) -> int | None:
    """The layer count to build: the first candidate whose estimate fits (memory_check)."""
    import torch

    from moelora.bench.memory_check import check_model_fits, engine_dtype, model_config_of
    from moelora.bench.weight_bytes import adapter_bytes, kv_bytes_per_token

    candidates = args.num_layers or [None]
    dtype = engine_dtype(args.model, args.dtype, args.device)
    elem = torch.tensor([], dtype=dtype).element_size()
    tokens = max(args.num_seqs) * (args.input_len + args.output_len)
    refusal = None
    for layers in candidates:
        config = model_config_of(args.model, layers)
        extra = (max(args.num_adapters) * adapter_bytes(config, args.rank, elem)
                 + tokens * config.num_layers * kv_bytes_per_token(config, elem))
        try:
            if not args.skip_memory_check:
                check_model_fits(args.model, layers, args.dtype, args.device,
                                 args.weights_built, extra, args.gpu_memory_utilization)
        except SystemExit as exc:
            refusal = str(exc)
            continue
        if layers != candidates[0]:
            notes.append(f"{candidates[0]} layers do not fit ({refusal}); built {layers}")
            print(f"note: {notes[-1]}")
        return layers
    raise SystemExit(refusal)


def build_engine(args, layers: int | None):
    """The engine of the benchmark (LoRA on, slots for every adapter, graphs as asked, experts
    stored as args.weights_built)."""
    from moelora.bench.engine_options import weights_options
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    extra = weights_options(args.weights_built)
    most = max(1, max(args.num_adapters))
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          enable_lora=True, max_lora_rank=args.rank, max_loras=most,
                          max_cpu_loras=most, max_num_seqs=max(args.num_seqs),
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                          load_progress=False, synthetic_num_layers=layers,
                          **flags.graph_options(args), **extra)
    return LLMEngine(config)


def run_from_args(args) -> int:
    from moelora.bench.latency_runs import LatencyRuns
    from moelora.bench.synthetic_adapters import adapter_directory

    _validate(args)
    if args.plot is not None:
        pyplot()  # before the run: a missing matplotlib stops it with its pip line
    notes = [args.note] if args.note else []
    if args.weights_built != args.weights:
        notes.append(f"this build has no option for {args.weights} experts: they were built "
                     f"unquantized, in the model dtype")
        print(f"note: {notes[-1]}")
    layers = _pick_layers(args, notes)
    engine = build_engine(args, layers)
    try:
        with adapter_directory(args.adapter_dir, "moelora-bench-latency-") as adapter_dir:
            records = LatencyRuns(engine, args, adapter_dir, random.Random(args.seed)).measure()
    finally:
        engine.stop()
    for record in records:
        record["notes"] = notes
    by_seqs = {}
    for record in records:
        by_seqs.setdefault(record["num_seqs"], {})[record["num_adapters"]] = record
    for group in by_seqs.values():
        base = group[0]
        for record in group.values():
            record["ratio_to_no_adapters"] = ratio(record["output_tokens_per_s"],
                                                   base["output_tokens_per_s"])
            record["step_wall_ratio_to_no_adapters"] = ratio(record["step_wall_ms"],
                                                             base["step_wall_ms"])
    first = records[0]
    print(f"\n{first['model']}: {first['num_layers']} layers, {first['weights']} experts, "
          f"{first['dtype']}, {first['device_name']}, graphs "
          f"{'on' if first['decode_graphs'] else 'off'}, rank {args.rank}, "
          f"{args.input_len} in / {args.output_len} out, medians of {args.rounds} rounds")
    print(format_table(TABLE, records))
    out = None if args.out == "-" else args.out
    for record in records:
        append_record(record, out)
    if out:
        print(f"{len(records)} records appended to {out}")
    if args.plot is not None:
        from moelora.bench.plots import plot_latency

        target = args.plot or os.path.splitext(out or "bench-latency")[0] + "-latency.png"
        print(f"plot saved to {plot_latency(records, target)}")
    return 0 if all(r["failed"] == 0 for r in records) else 1


def main(argv=None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="moelora bench latency"))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

