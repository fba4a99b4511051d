"""The decode-graph switches the server (entrypoints/) and the benchmarks (bench/) share: vLLM's --enforce-eager and
moelora's --decode-graphs, and the EngineConfig.decode_graphs value they select."""

from __future__ import annotations

import argparse


def add_graph_arguments(parser: argparse.ArgumentParser) -> None:
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
