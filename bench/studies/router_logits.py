"""The router GEMM of a decode step: torch's linear (cuBLAS: a split-K GEMM and its reduction)
against moe_router_logits (one launch), kernel durations by torch.profiler, mean over --calls
eager calls after a warm-up, at gpt-oss-20b's shape by default (32 experts, hidden 2880, bf16,
with bias). Answers whether ROUTER_KERNEL_MAX_LOGITS should move (docs/performance.md, "Router
logits"). One JSON line per token count, appended to --out. GPU only.

    python3 bench/studies/router_logits.py --tokens 1 16 64 --out router.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
import torch.nn.functional as F
from moelora.ops import moe as moe_ops
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def kernel_us(call, calls: int) -> dict[str, float]:
    """{kernel name: mean microseconds per call} of `calls` calls."""
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            totals[event.name[:60]] += (event.time_range.end - event.time_range.start) / calls
    return {name: round(us, 2) for name, us in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    weight = (torch.randn(args.experts, args.hidden, device=dev) / args.hidden**0.5).to(dtype)
    bias = torch.randn(args.experts, device=dev).to(dtype)
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, device=dev).to(dtype)
        torch_side = kernel_us(lambda x=x: F.linear(x, weight, bias), args.calls)
        ours = kernel_us(lambda x=x: moe_ops.router_logits(x, weight, bias, native=True),
                         args.calls)
        record = {"study": "router_logits_kernel", "device_name": torch.cuda.get_device_name(),
                  "dtype": "bfloat16", "tokens": tokens, "experts": args.experts,
                  "hidden": args.hidden, "bias": True, "torch_kernels_us": torch_side,
                  "torch_us": round(sum(torch_side.values()), 2),
                  "moe_router_logits_us": round(sum(ours.values()), 2)}
        print(json.dumps(record))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
