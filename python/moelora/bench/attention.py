"""`moelora bench attention`: paged decode attention over the page pool, per layer.

One query token per sequence (decode) against contexts of --context-lens keys, for --batches
sequences, GQA heads of a Qwen3/Llama-like layer (32 query heads, 8 KV heads, head_dim 128 by
default), bf16 KV pages scattered at random in the arena. Prints one JSON line per case:
median GPU time of a CUDA-graph replay with L2 flushed before each (attention_us) and the
roofline: K and V bytes read / 4.2 TB/s (the H200's measured copy rate). Each case runs the
attention plan (ops.plan_attention) with the kernel chain starting at each of --kernels (mma =
tensor-core GQA, gqa = CUDA-core GQA, per_head = one CTA per query head; auto = the plan's) and
each split-KV factor of --splits (auto = the plan's rule; 1 = no split-KV, the baseline); the
record says which kernel and splits it forced.

    python -m moelora.bench.attention --kernels auto gqa per_head --splits auto 1 \
        --out bench/results/h200-attention.jsonl
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from moelora import ops
from moelora.bench.kernels import graph_of, median_event_us

HBM_BYTES_PER_US = 4.2e6  # 4.2 TB/s


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--context-lens", nargs="+", type=int, default=[1024, 8192, 32768])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--kernels", nargs="+", default=["auto"],
                        choices=["auto", "mma", "gqa", "per_head"],
                        help="where the kernel chain starts, one record each")
    parser.add_argument("--splits", nargs="+", default=["auto"],
                        help="split-KV factors to force (1-8), or auto (the plan's rule)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    return parser


def _case(context: int, batch: int, kernel: str, splits: str, args, flush) -> dict:
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    blocks = -(-context // args.block_tokens)
    page_bytes = ops.kv_page_bytes_needed(args.block_tokens, args.num_kv_heads, args.head_dim,
                                          dtype)
    num_pages = batch * blocks
    arena = torch.randint(0, 255, (num_pages * page_bytes,), dtype=torch.uint8, device=dev)
    # random bf16 bytes may be NaN/Inf: overwrite with finite values
    arena.view(dtype).normal_()
    cache = ops.make_kv_cache_view(arena, page_bytes=page_bytes, block_tokens=args.block_tokens,
                                   num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                                   dtype=dtype)
    block_table = torch.randperm(num_pages, device=dev).to(torch.int32).view(batch, blocks)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    query = torch.randn(batch, args.num_heads, args.head_dim, dtype=dtype, device=dev)
    query_seq = torch.arange(batch, dtype=torch.int32, device=dev)
    query_pos = seq_lens - 1
    out = torch.empty_like(query)
    scale = 1.0 / math.sqrt(args.head_dim)

    overrides = ops.PlanOverrides(attention_kernel=kernel,
                                  attention_splits=None if splits == "auto" else int(splits))
    plan = ops.plan_attention(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                              head_dim=args.head_dim, page_bytes=page_bytes,
                              max_context=blocks * args.block_tokens, dtype=dtype, device=dev,
                              overrides=overrides)

    def run():
        ops.paged_attention(query, query_seq, query_pos, block_table, seq_lens, cache, scale,
                            out=out, plan=plan)

    graph = graph_of(run)
    us = median_event_us(graph.replay, args.iters, flush)
    kv_bytes = 2 * batch * context * args.num_kv_heads * args.head_dim * 2
    return {"bench": "attention", "device": torch.cuda.get_device_name(), "dtype": "bfloat16",
            "context": context, "batch": batch, "num_heads": args.num_heads,
            "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim,
            "splits": splits, "kernel": kernel, "plan": repr(plan),
            "attention_us": round(us, 2), "roofline_us": round(kv_bytes / HBM_BYTES_PER_US, 2),
            "roofline_fraction": round(kv_bytes / HBM_BYTES_PER_US / us, 3)}


def main(argv=None) -> int:
    args = add_cli_args(argparse.ArgumentParser(prog="moelora bench attention")).parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moelora bench attention needs a CUDA GPU")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    out_file = open(args.out, "a") if args.out else None  # noqa: SIM115 (closed below)
    try:
        for context in args.context_lens:
            for batch in args.batches:
                for kernel in args.kernels:
                    for splits in args.splits:
                        record = _case(context, batch, kernel, splits, args, flush)
                        print(json.dumps(record), flush=True)
                        if out_file:
                            out_file.write(json.dumps(record) + "\n")
    finally:
        if out_file:
            out_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
