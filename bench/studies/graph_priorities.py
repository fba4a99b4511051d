"""What replaying the decode graphs at their kernels' own priorities gives: the LoRA kernels,
captured on a high-priority stream beside the base GEMMs, dispatched ahead of the GEMMs' pending
CTAs (engine/priority_graph.py) against every kernel at the launch stream's priority (torch's
replay), in one engine, interleaved.

    PYTHONPATH=python python3 bench/studies/graph_priorities.py --model synthetic:gpt-oss-20b \
        --weights mxfp4 --num-seqs 16 64 --num-adapters 1 16 --rounds 2 --out prio.jsonl

Takes `moelora bench latency`'s flags (its workload: random prompts, ignore_eos, warm adapters).
Per batch size: a warm-up run per adapter count, then --rounds rounds in which every adapter count
(0 included) runs with node priorities and without, one after the other. Prints per (sequences,
adapters) the median step wall and GPU ms and output tok/s of both sides and their ratio, and
appends one JSON line per side to --out (field `node_priorities`; the card in `device_name`).
"""

from __future__ import annotations

import argparse
import random
import sys

from moelora.bench import latency
from moelora.bench.latency_runs import LatencyRuns
from moelora.bench.records import append_record, engine_fields, median
from moelora.bench.synthetic_adapters import adapter_directory

FIELDS = ("step_wall_ms", "step_gpu_ms", "output_tokens_per_s", "tpot_p50_ms")


def measure(engine, args, adapter_dir: str) -> list[dict]:
    graphs = engine.runner.graphs
    if graphs is None or not graphs.capture:
        raise SystemExit("decode graphs are off: nothing to compare (a CUDA device is needed)")
    runs = LatencyRuns(engine, args, adapter_dir, random.Random(args.seed))
    timed: dict[tuple, list[dict]] = {}
    for num_seqs in args.num_seqs:
        for count in args.num_adapters:
            runs._run(num_seqs, count)
        for _ in range(args.rounds):
            for count in args.num_adapters:
                for on in (True, False):
                    graphs.node_priorities = on
                    timed.setdefault((num_seqs, count, on), []).append(
                        runs._timed(num_seqs, count))
    graphs.node_priorities = True
    fields = engine_fields(engine)
    return [{"study": "graph_priorities", "model": args.model, **fields,
             "weights": args.weights_built, "num_layers": engine.model.config.num_layers,
             "num_seqs": n, "num_adapters": c, "node_priorities": on, "rounds": args.rounds, "note": args.note,
             **{f: median([r[f] for r in rows if r[f] is not None]) for f in FIELDS},
             "rounds_step_wall_ms": [r["step_wall_ms"] for r in rows]}
            for (n, c, on), rows in timed.items()]


def main(argv=None) -> int:
    parser = latency.add_cli_args(argparse.ArgumentParser(prog="graph_priorities.py"))
    parser.set_defaults(out="-")  # not the latency benchmark's results file
    args = parser.parse_args(argv)
    latency._validate(args)
    engine = latency.build_engine(args, latency._pick_layers(args, []))
    try:
        with adapter_directory(args.adapter_dir, "moelora-graph-priorities-") as adapter_dir:
            records = measure(engine, args, adapter_dir)
    finally:
        engine.stop()
    by_key = {(r["num_seqs"], r["num_adapters"], r["node_priorities"]): r for r in records}
    print(f"{records[0]['model']} on {records[0]['device_name']}, medians of {args.rounds}")
    print("seqs adapters | wall ms prio / plain | GPU ms prio / plain | tok/s prio / plain")
    for (n, c, on), r in sorted(by_key.items()):
        if not on:
            continue
        p = by_key[(n, c, False)]
        print(f"{n:4d} {c:8d} | {r['step_wall_ms']:7.3f} {p['step_wall_ms']:7.3f} "
              f"({r['step_wall_ms'] / p['step_wall_ms']:.3f}) | "
              f"{r['step_gpu_ms'] or 0:7.3f} {p['step_gpu_ms'] or 0:7.3f} | "
              f"{r['output_tokens_per_s']:8.0f} {p['output_tokens_per_s']:8.0f}")
    out = None if args.out == "-" else args.out
    for record in records:
        append_record(record, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
