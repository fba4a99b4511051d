"""One MoE layer's base experts on the GPU (routing + w13 + activation + w2 + top-k sum), per
weight format, against torch's grouped_mm bf16 path on the same routing.

    python -m moelora.bench.moe --presets gpt-oss-20b qwen3-30b-a3b \
        --tokens 1 8 16 32 64 128 512 2048 --out bench/results/moe-layer.jsonl

Per (preset, tokens, weights): the fused layer (moelora.ops.moe: route, expert_gemm for w13 with
the activation fused, expert_gemm for w2 with the routing weights, moe_sum) captured in one CUDA
graph and replayed (CUDA events, median, L2 flushed before each replay unless --warm-l2); each of
its four ops in a graph of its own; the layer eager with a host clock; and the torch path on the
same routing (argsort, gather, torch._grouped_mm bf16, activation, grouped_mm, weighting,
index_add) over bf16 weights of the same shapes. Bytes: the touched experts' weights as stored
(MXFP4 4.25 bits a weight, FP8 1 byte plus block scales, bf16 2 bytes; biases), the input and the
output; roofline = bytes / the card's copy rate (BENCHMARKS.md: H100 3.0 TB/s, H200 4.18 TB/s).
One JSON line per case on stdout, appended to --out when given.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from moelora.bench.kernels import graph_of, median_event_us, median_host_us
from moelora.ops import moe as moe_ops

# hidden, inter (per expert), experts, top_k, routing, activation, default weight formats
PRESETS = {
    "gpt-oss-20b": (2880, 2880, 32, 4, "topk_softmax", "gpt_oss", ("bf16", "mxfp4")),
    "qwen3-30b-a3b": (2048, 768, 128, 8, "softmax_topk", "silu", ("bf16", "fp8")),
    "mixtral-8x7b": (4096, 14336, 8, 2, "softmax_topk", "silu", ("bf16", "fp8")),
    "olmoe-1b-7b": (2048, 1024, 64, 8, "softmax_topk", "silu", ("bf16", "fp8")),
}
COPY_RATE = {"H200": 4.18e12, "H100": 3.0e12}  # bytes/s, BENCHMARKS.md
FP8_BLOCK = (128, 128)


def copy_rate(device_name: str, override: float | None) -> float:
    if override:
        return override * 1e12
    return next((rate for card, rate in COPY_RATE.items() if card in device_name), 3.0e12)


def stack(fmt: str, experts: int, n: int, k: int, gen, device,
          bias: bool) -> moe_ops.ExpertWeights:
    """Random weights of spread ~1/sqrt(k) as `fmt` stores them ("bf16", "mxfp4", "fp8")."""
    spread = k ** -0.5
    b = (torch.randn(experts, n, generator=gen, device=device) * 0.1).bfloat16() if bias else None
    if fmt == "bf16":
        w = (torch.randn(experts, n, k, generator=gen, device=device) * spread).bfloat16()
        return moe_ops.ExpertWeights("dense", w, bias=b)
    if fmt == "mxfp4":
        blocks = torch.randint(0, 256, (experts, n, k // 32, 16), generator=gen, device=device,
                               dtype=torch.uint8)
        center = 127 + round(math.log2(spread / 2.93))  # random E2M1 codes: RMS 2.93
        scales = torch.randint(center - 1, center + 2, (experts, n, k // 32), generator=gen,
                               device=device, dtype=torch.uint8)
        return moe_ops.ExpertWeights("mxfp4", blocks, scales, b)
    bn, bk = FP8_BLOCK
    w = torch.randn(experts, n, k, generator=gen, device=device).to(torch.float8_e4m3fn)
    scales = spread * (0.5 + torch.rand(experts, -(-n // bn), -(-k // bk), generator=gen,
                                        device=device))
    return moe_ops.ExpertWeights("fp8", w, scales, b, bn, bk)


def expert_bytes(w: moe_ops.ExpertWeights) -> int:
    """Bytes of one expert of the stack as stored (weights, scales, bias)."""
    total = w.weight[0].numel() * w.weight.element_size()
    for t in (w.scales, w.bias):
        if t is not None:
            total += t[0].numel() * t.element_size()
    return total


def fused_layer(x, logits, w13, w2, top_k, routing, activation):
    r = moe_ops.route(logits, top_k, routing, True)
    h = moe_ops.expert_gemm(x, r, w13, input_pairs_per_row=top_k, activation=activation)
    y = moe_ops.expert_gemm(h, r, w2, input_pairs_per_row=1,
                            topk_weights=r.topk_weights.view(-1))
    return moe_ops.moe_sum(y, top_k)


def torch_layer(x, routing, w13, w2, b13, b2, activation):
    """The grouped_mm path on the same routing (the model's MoE block before the fused ops)."""
    top_k = routing.top_k
    flat = routing.topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device).scatter_add_(
        0, flat.long(), torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    sorted_ids = flat[order].long()
    h13 = torch._grouped_mm(x[order // top_k], w13.transpose(1, 2), offs=offs)
    if b13 is not None:
        h13 = h13 + b13[sorted_ids]
    inter = h13.shape[1] // 2
    gate, up = h13[:, :inter], h13[:, inter:]
    if activation == "silu":
        h = F.silu(gate) * up
    else:
        gate, up = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
        h = (up + 1) * gate * torch.sigmoid(1.702 * gate)
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    if b2 is not None:
        y = y + b2[sorted_ids]
    y = y * routing.topk_weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, order // top_k, y)


def run_case(preset, tokens, fmt, weights, bf16_weights, args, flush, rate):
    hidden, _inter, experts, top_k, routing_kind, activation, _ = PRESETS[preset]
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen, device=device).bfloat16()
    logits = torch.randn(tokens, experts, generator=gen, device=device)
    w13, w2 = weights
    layer = lambda: fused_layer(x, logits, w13, w2, top_k, routing_kind, activation)
    layer_us = median_event_us(graph_of(layer).replay, args.iters, flush)
    host_us = median_host_us(layer, args.iters)

    r = moe_ops.route(logits, top_k, routing_kind, True)
    h = moe_ops.expert_gemm(x, r, w13, input_pairs_per_row=top_k, activation=activation)
    y = moe_ops.expert_gemm(h, r, w2, input_pairs_per_row=1, topk_weights=r.topk_weights.view(-1))
    ops_us = {}
    for name, fn in (
            ("route", lambda: moe_ops.route(logits, top_k, routing_kind, True)),
            ("w13", lambda: moe_ops.expert_gemm(x, r, w13, input_pairs_per_row=top_k,
                                                activation=activation, out=h)),
            ("w2", lambda: moe_ops.expert_gemm(h, r, w2, input_pairs_per_row=1,
                                               topk_weights=r.topk_weights.view(-1), out=y)),
            ("sum", lambda: moe_ops.moe_sum(y, top_k))):
        ops_us[name] = round(median_event_us(graph_of(fn).replay, args.iters, flush), 2)

    touched = int((r.expert_counts > 0).sum().item())
    weight_bytes = touched * (expert_bytes(w13) + expert_bytes(w2))
    io_bytes = 2 * tokens * hidden * x.element_size()  # x in, out
    roofline_us = (weight_bytes + io_bytes) / rate * 1e6
    torch_us = None
    if hasattr(torch, "_grouped_mm") and not args.no_torch:
        b13, b2 = bf16_weights[0].bias, bf16_weights[1].bias
        base = lambda: torch_layer(x, r, bf16_weights[0].weight, bf16_weights[1].weight,
                                   b13, b2, activation)
        try:
            torch_us = round(median_event_us(graph_of(base).replay, args.iters, flush), 2)
        except Exception as error:  # noqa: BLE001 - grouped_mm constraints vary by torch version
            print(f"# torch grouped_mm baseline failed: {error}", flush=True)
    return {
        "preset": preset, "tokens": tokens, "weights": fmt, "dtype": "bfloat16",
        "device": torch.cuda.get_device_name(), "layer_us": round(layer_us, 2),
        "layer_with_host_us": round(host_us, 2), "ops_us": ops_us, "kernels": 4,
        "block_m": r.block_m, "touched_experts": touched,
        "bytes": weight_bytes + io_bytes, "roofline_us": round(roofline_us, 2),
        "roofline_fraction": round(roofline_us / layer_us, 3),
        "achieved_gbps": round((weight_bytes + io_bytes) / layer_us / 1e3, 1),
        "torch_grouped_mm_us": torch_us,
        "speedup_vs_grouped_mm": round(torch_us / layer_us, 2) if torch_us else None,
    }


def run_preset(preset, args, out_file, rate):
    hidden, inter, experts, _top_k, _, _, formats = PRESETS[preset]
    device = torch.device("cuda")
    flush = None if args.warm_l2 else torch.empty(256 << 20, dtype=torch.uint8, device=device)
    bias = preset == "gpt-oss-20b"
    gen = torch.Generator(device=device).manual_seed(0)
    bf16 = (stack("bf16", experts, 2 * inter, hidden, gen, device, bias),
            stack("bf16", experts, hidden, inter, gen, device, bias))
    for fmt in args.weights or formats:
        weights = bf16 if fmt == "bf16" else (
            stack(fmt, experts, 2 * inter, hidden, gen, device, bias),
            stack(fmt, experts, hidden, inter, gen, device, bias))
        time.sleep(args.settle_s)
        for tokens in args.tokens:
            record = run_case(preset, tokens, fmt, weights, bf16, args, flush, rate)
            line = json.dumps(record)
            print(line, flush=True)
            if out_file is not None:
                out_file.write(line + "\n")
                out_file.flush()
        del weights
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["gpt-oss-20b", "qwen3-30b-a3b"],
                        choices=sorted(PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int,
                        default=[1, 8, 16, 32, 64, 128, 512, 2048])
    parser.add_argument("--weights", nargs="+", choices=["bf16", "mxfp4", "fp8"],
                        help="weight formats (default: bf16 and the preset's quantized one)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warm-l2", action="store_true", help="do not flush L2 between replays")
    parser.add_argument("--no-torch", action="store_true", help="skip the grouped_mm baseline")
    parser.add_argument("--copy-tbps", type=float, default=None,
                        help="copy rate for the roofline in TB/s (default: by card, 3.0 H100)")
    parser.add_argument("--settle-s", type=float, default=1.0,
                        help="idle seconds before each weight format's cases")
    parser.add_argument("--out", help="append JSON lines to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moelora.bench.moe needs a CUDA GPU")
    rate = copy_rate(torch.cuda.get_device_name(), args.copy_tbps)
    out_file = open(args.out, "a") if args.out else None  # noqa: SIM115
    try:
        for preset in args.presets:
            run_preset(preset, args, out_file, rate)
    finally:
        if out_file is not None:
            out_file.close()


if __name__ == "__main__":
    main()
