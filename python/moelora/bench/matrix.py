"""`moelora bench e2e-matrix`: the end-to-end GPU matrix of issue 20, one command.

  synthetic gpt-oss-20b, all 24 layers, experts in MXFP4 (bf16, with a note in every record,
      when this build cannot build MXFP4 experts);
  synthetic qwen3-30b-a3b in bf16, all 48 layers when they and the adapters fit the GPU, else
      the first 24 (decided from free memory before building);
each at 1, 16 and 64 concurrent sequences with 0, 1 and 16 rank-16 adapters on attention and
experts: `moelora bench latency` per model, in its own process (so one model's memory is gone
before the next is built), each model built once and reused across every sequence and adapter
count, short outputs, one warm-up per batch size. Every (model, sequences, adapters) appends one
JSON line to --out; a plot per model lands beside it. About 5 minutes on an H100 with the
defaults. --dry-run prints the commands.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from moelora.bench import flags
from moelora.bench.latency import DEFAULT_OUT

MODELS = {
    "gpt-oss-20b": {"weights": "mxfp4", "layers": "24"},
    "qwen3-30b-a3b": {"weights": "bf16", "layers": "48,24"},
}


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    flags.describe(parser, __doc__)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                        help="synthetic presets to run")
    parser.add_argument("--num-seqs", type=flags.positive_int, nargs="+", default=[1, 16, 64],
                        help="batch sizes")
    parser.add_argument("--num-adapters", type=int, nargs="+", default=[0, 1, 16],
                        help="adapter counts")
    parser.add_argument("--rank", type=flags.positive_int, default=16, help="adapter rank")
    parser.add_argument("--input-len", type=flags.positive_int, default=128,
                        help="prompt tokens per sequence")
    parser.add_argument("--output-len", type=flags.positive_int, default=96,
                        help="generated tokens per sequence")
    parser.add_argument("--rounds", type=flags.positive_int, default=2,
                        help="timed rounds per (sequences, adapters)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON lines are appended here")
    parser.add_argument("--adapter-root", default=None,
                        help="adapters go to <root>/<preset> (reused when complete; default: "
                             "temporary directories)")
    parser.add_argument("--note", default=None, help="a note saved in every record")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    return parser


def latency_command(args, preset: str) -> list[str]:
    spec = MODELS[preset]
    command = [sys.executable, "-m", "moelora.bench.latency", "--model", f"synthetic:{preset}",
               "--weights", spec["weights"], "--num-layers", spec["layers"],
               "--num-seqs", *map(str, args.num_seqs),
               "--num-adapters", *map(str, args.num_adapters), "--rank", str(args.rank),
               "--input-len", str(args.input_len), "--output-len", str(args.output_len),
               "--rounds", str(args.rounds), "--out", args.out,
               "--plot", os.path.splitext(args.out)[0] + f"-{preset}.png"]
    if args.adapter_root:
        command += ["--adapter-dir", os.path.join(args.adapter_root, preset)]
    if args.note:
        command += ["--note", args.note]
    return command


def run_from_args(args) -> int:
    failures = []
    for preset in args.models:
        command = latency_command(args, preset)
        print("+", shlex.join(command), flush=True)
        if args.dry_run:
            continue
        start = time.monotonic()
        code = subprocess.run(command, check=False).returncode
        print(f"{preset}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
        if code != 0:
            failures.append(preset)
    if failures:
        print(f"failed: {', '.join(failures)}")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="moelora bench e2e-matrix"))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
