"""The step-graph switches the server (entrypoints/) and the benchmarks (bench/) share: vLLM's
--enforce-eager and --max-cudagraph-capture-size, moelora's --decode-graphs, and the EngineConfig
values they select."""

from __future__ import annotations

import argparse


def add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--decode-graphs", action="store_true",
                       help="replay steps from CUDA graphs (already the default for a "
                            "one-process engine on a CUDA device)")
    group.add_argument("--enforce-eager", action="store_true",
                       help="run every step eagerly, no CUDA graphs (vLLM's flag)")
    parser.add_argument("--max-cudagraph-capture-size", type=int, default=None,
                        help="the largest step, in tokens, replayed from a CUDA graph (default: "
                             "max-num-seqs, or 256 where that is larger, within "
                             "max-num-batched-tokens)")


def graphs_choice(args: argparse.Namespace) -> bool | None:
    """EngineConfig.decode_graphs: False, True, or None for the device's default."""
    if args.enforce_eager:
        return False
    return True if args.decode_graphs else None


def graph_options(args: argparse.Namespace) -> dict:
    """The EngineConfig fields these flags set."""
    return {"decode_graphs": graphs_choice(args),
            "max_cudagraph_capture_size": args.max_cudagraph_capture_size}
