"""Flags the end-to-end benchmarks share, and the help format they all use (every flag with its
default, the command's docstring as its description)."""

from __future__ import annotations

import argparse

from moelora.graph_flags import add_graph_arguments, graph_options, graphs_choice

__all__ = ["WEIGHT_CHOICES", "add_engine_placement_arguments", "add_graph_arguments",
           "describe", "graph_options", "graphs_choice"]

WEIGHT_CHOICES = ("bf16", "mxfp4", "fp8")  # how experts are stored (weight_bytes.py)


def describe(parser: argparse.ArgumentParser, doc: str | None) -> None:
    """Gives `parser` the module docstring as its description (unless it has one) and a help
    format that shows every flag's default and keeps the description's paragraphs."""
    if not parser.description and doc:
        parser.description = doc
    parser.formatter_class = _Formatter


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def rate(text: str) -> float:
    """A request rate: a positive number or inf (all at once)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0 or inf, got {text}")
    return value


def add_host_block_argument(parser: argparse.ArgumentParser) -> None:
    """--host-block-mb: EngineConfig.adapter_host_block_bytes, in MB (read it with host_block_bytes)."""
    parser.add_argument("--host-block-mb", type=int, default=8,
                        help="adapters' host copies in blocks of this many MB, page-locked beside "
                             "the read (0: one block, page-locked before it)")


def host_block_bytes(args) -> int:
    if args.host_block_mb < 0:
        raise SystemExit(f"--host-block-mb must be >= 0, got {args.host_block_mb}")
    return args.host_block_mb << 20


def add_host_reserve_argument(parser: argparse.ArgumentParser) -> None:
    """--host-reserve-mb: EngineConfig.adapter_host_reserve_bytes, in MB (host_reserve_bytes)."""
    parser.add_argument("--host-reserve-mb", type=int, default=None,
                        help="host memory kept ready (faulted in, page-locked) for adapters' host "
                             "copies, in MB (default: one largest adapter per device slot, at "
                             "most 16 GiB and 1/8 of the machine's memory; 0: none)")


def host_reserve_bytes(args) -> int | None:
    if args.host_reserve_mb is None:
        return None
    if args.host_reserve_mb < 0:
        raise SystemExit(f"--host-reserve-mb must be >= 0, got {args.host_reserve_mb}")
    return args.host_reserve_mb << 20


def add_memory_check_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="build the model even when the estimate says it cannot fit")


def add_engine_placement_arguments(parser: argparse.ArgumentParser,
                                   seed_help: str = "prompts and adapter weights") -> None:
    """--device, --dtype, --seed and --adapter-dir, as every engine benchmark takes them."""
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--adapter-dir", default=None,
                        help="where to write the adapters (reused when complete; default: a "
                             "temporary directory, removed at the end)")
