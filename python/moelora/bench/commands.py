"""The `moelora bench` subcommands this package adds to the CLI: each one's module builds its
own flags (`add_cli_args`) and runs (`run_from_args`); nothing heavy is imported to build the
parser."""

from __future__ import annotations

import importlib

COMMANDS = (
    ("latency", "moelora.bench.latency",
     "decode step wall/GPU ms, kernels, roofline, tok/s, TTFT/TPOT: 0 vs N adapters"),
    ("adapters", "moelora.bench.adapters",
     "adapter load rates (disk, host, device) against a plain parallel read of the files"),
    ("cold-ttft", "moelora.bench.cold_ttft",
     "TTFT of a request whose adapter is cold, against its bytes' read time + two steps"),
    ("e2e-matrix", "moelora.bench.matrix",
     "the end-to-end GPU matrix: gpt-oss-20b and qwen3-30b-a3b x sequences x adapters"),
    ("serve-synthetic", "moelora.bench.serve_synthetic",
     "start `moelora serve` on a synthetic model and run `bench serve` against it"),
)


def add_bench_commands(bench_subparsers) -> None:
    """Registers COMMANDS under `moelora bench`."""
    for name, module_name, summary in COMMANDS:
        module = importlib.import_module(module_name)
        parser = bench_subparsers.add_parser(name, help=summary)
        module.add_cli_args(parser)
        parser.set_defaults(func=module.run_from_args)
