"""The decode step's dense projections (QKV, output, router) on cuBLAS (torch's linear, what the
models run) against the tiled tensor-core expert GEMM over one "expert" (moe_expert_gemm, dense
bf16, split-K by shape), per row count. Answers whether the projections, at ~0.5 of their
weight-bytes roofline on cuBLAS at 16 sequences (docs/performance.md "The decode step"), should
move to our kernel. Graph replay, L2 flushed, median; checks both results against float32.
One JSON line per (shape, rows) appended to --out. GPU only.

    python3 bench/studies/dense_decode_gemm.py --out dense-decode.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from moelora.bench.kernels import graph_of, median_event_us
from moelora.ops import moe as moe_ops

# (name, in_dim, out_dim, bias)
SHAPES = {
    "gpt-oss-20b-qkv": (2880, 5120, True),
    "gpt-oss-20b-o": (4096, 2880, True),
    "gpt-oss-20b-router": (2880, 32, True),
    "qwen3-30b-a3b-qkv": (2048, 5120, False),
    "qwen3-30b-a3b-o": (4096, 2048, False),
    "qwen3-30b-a3b-router": (2048, 128, False),
}
COPY_RATE = {"H100": 3.0e12, "H200": 4.18e12}


def time_shape(name, rows, iters, flush, device, rate):
    in_dim, out_dim, has_bias = SHAPES[name]
    gen = torch.Generator(device=device).manual_seed(rows)
    dtype = torch.bfloat16
    x = torch.randn(rows, in_dim, generator=gen, device=device).to(dtype)
    w = (torch.randn(out_dim, in_dim, generator=gen, device=device) / in_dim ** 0.5).to(dtype)
    b = torch.randn(out_dim, generator=gen, device=device).to(dtype) if has_bias else None
    want = x.float() @ w.float().t() + (b.float() if b is not None else 0)
    record = {"shape": name, "rows": rows, "in_dim": in_dim, "out_dim": out_dim,
              "roofline_us": w.numel() * 2 / rate * 1e6}
    out = torch.empty(rows, out_dim, dtype=dtype, device=device)
    record["cublas_us"] = median_event_us(graph_of(lambda: F.linear(x, w, b)).replay, iters,
                                          flush)
    record["cublas_err"] = (F.linear(x, w, b).float() - want).abs().max().item()
    weights = moe_ops.ExpertWeights("dense", w.unsqueeze(0),
                                    bias=b.unsqueeze(0) if b is not None else None)
    for block_m in (8, 16, 32):
        if block_m < rows / 2 or (block_m > 8 and block_m // 2 >= rows):
            continue
        # every row to the one expert, as route() groups them
        routing = moe_ops.route(torch.zeros(rows, 1, device=device), 1, block_m=block_m)

        def ours(routing=routing):
            moe_ops.expert_gemm(x, routing, weights, input_pairs_per_row=1, out=out,
                                kernel="tensor_core", splits=moe_ops.SPLIT_BY_SHAPE)

        ours()
        record[f"ours_m{block_m}_err"] = (out.float() - want).abs().max().item()
        record[f"ours_m{block_m}_splits"] = moe_ops.gemm_splits(x, routing, weights, False)
        record[f"ours_m{block_m}_us"] = median_event_us(graph_of(ours).replay, iters, flush)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    rate = next((r for k, r in COPY_RATE.items() if k in card), COPY_RATE["H100"])
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    for name in args.shapes:
        for rows in args.rows:
            record = {"device_name": card, **time_shape(name, rows, args.iters, flush, device,
                                                        rate)}
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
