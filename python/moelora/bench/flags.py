"""Flags the end-to-end benchmarks share, and the help format they all use (every flag with its
default, the command's docstring as its description)."""

from __future__ import annotations

import argparse

WEIGHT_CHOICES = ("bf16", "mxfp4", "fp8")  # how experts are stored (weight_bytes.py)


def describe(parser: argparse.ArgumentParser, doc: str | None) -> None:
    """Gives `parser` the module docstring as its description (unless it has one) and a help
    format that shows every flag's default and keeps the description's paragraphs."""
    if not parser.description and doc:
        parser.description = doc
    parser.formatter_class = _Formatter


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's --enforce-eager and moelora's --decode-graphs (decode steps from CUDA graphs)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--decode-graphs", action="store_true",
                       help="replay decode steps from CUDA graphs (already the default for a "
                            "one-process engine on a CUDA device)")
    group.add_argument("--enforce-eager", action="store_true",
                       help="run every step eagerly, no CUDA graphs (vLLM's flag)")


def graphs_choice(args: argparse.Namespace) -> bool | None:
    """EngineConfig.decode_graphs: False, True, or None for the device's default."""
    if args.enforce_eager:
        return False
    return True if args.decode_graphs else None


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


def add_memory_check_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="build the model even when the estimate says it cannot fit")
