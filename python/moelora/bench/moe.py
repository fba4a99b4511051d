"""One MoE layer's base experts on the GPU (routing + w13 + activation + w2 + top-k sum), per
weight format and expert GEMM variant, against torch's grouped_mm bf16 path on the same routing.

    python -m moelora.bench.moe --presets gpt-oss-20b qwen3-30b-a3b \
        --tokens 1 8 16 32 64 128 512 2048 --out bench/results/moe-layer.jsonl
    python -m moelora.bench.moe --variants tiles plan stream:8 stream:16:8 tensor_core:32
    python -m moelora.bench.moe --presets gpt-oss-20b --weights mxfp4 --tokens 1 16 64 \
        --variants tiles plan tensor_core:8:s2 tensor_core:8:s4 --table

Variants: "plan" (the step's plan, moelora.ops.moe.GEMM_PLAN, falling back as the model does),
"tiles" (the tiled tensor-core kernel, unsplit, with rows per block four times the mean rows per
touched expert: the form before the plan existed, the baseline every ratio is against), or
kernel[:block_m[:consumers]][:s[ways]] run strictly (ops.moe.GemmPlan.parse; ":s4" splits K four
ways in both GEMMs, ":s" by ops.moe.split_k_ways per GEMM; a variant that cannot take a case is
reported, not replaced). Each record names the split-K ways each GEMM ran with. Per (preset, tokens,
weights, variant): the fused layer (moelora.ops.moe: route, expert_gemm for w13 with the activation
fused, expert_gemm for w2 with the routing weights, moe_sum) captured in one CUDA graph and replayed
(CUDA events, median, L2 flushed before each replay unless --warm-l2); its two GEMMs each in a graph
of their own (and route and sum for the first variant); the layer eager with a host clock; and, once
per (preset, tokens), the torch path on the same routing (argsort, gather, torch._grouped_mm bf16,
activation, grouped_mm, weighting, index_add) over bf16 weights of the same shapes. Bytes: the
touched experts' weights as stored (MXFP4 4.25 bits a weight, FP8 1 byte plus block scales, bf16 2
bytes; biases), the input and the output; roofline = bytes / the card's copy rate (BENCHMARKS.md:
H100 3.0 TB/s, H200 4.18 TB/s). One JSON line per case on stdout, appended to --out when given;
--table prints every variant side by side at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from moelora import InvalidArgument
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


def stack(fmt: str, experts: int, n: int, k: int, gen, device, bias: bool,
          mxfp4_layout: str = "mma_tiled") -> moe_ops.ExpertWeights:
    """Random weights of spread ~1/sqrt(k) as `fmt` stores them ("bf16", "mxfp4", "fp8"); MXFP4
    blocks in `mxfp4_layout`, by default the engine's (CausalLM.pack_for_kernels)."""
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
        blocks = moe_ops.mxfp4_to_mma_layout(blocks, out=blocks)
        if mxfp4_layout == "mma":
            return moe_ops.ExpertWeights("mxfp4", blocks, scales, b, layout="mma")
        tiles, tile_scales = moe_ops.mxfp4_to_tiled_layout(blocks, scales)
        return moe_ops.ExpertWeights("mxfp4", tiles, tile_scales, b, layout="mma_tiled", k=k)
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


def legacy_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block of the "tiles" baseline: about four times the mean rows per touched
    expert, 64 at prefill."""
    per_expert = num_pairs / max(1, min(num_experts, num_pairs))
    for block_m in moe_ops.TENSOR_CORE_BLOCK_M[:-1]:
        if 4 * per_expert <= block_m:
            return block_m
    return moe_ops.TENSOR_CORE_BLOCK_M[-1]


def variant_plan(variant: str, num_pairs: int, num_experts: int,
                 fmt: str) -> tuple[moe_ops.GemmPlan, bool]:
    """(the plan, whether it runs strictly) of a --variants name for one case."""
    stored = "dense" if fmt == "bf16" else fmt
    if variant == "plan":
        return moe_ops.plan_expert_gemm(num_pairs, num_experts, stored), False
    if variant == "tiles":
        return moe_ops.GemmPlan("tensor_core", legacy_block_m(num_pairs, num_experts)), True
    return moe_ops.GemmPlan.parse(variant), True


class Layer:
    """One layer's ops on fixed inputs under one plan (strict: the plan's kernel by name)."""

    def __init__(self, x, logits, w13, w2, top_k, routing, activation, plan, strict):
        self.x, self.logits, self.w13, self.w2 = x, logits, w13, w2
        self.top_k, self.routing, self.activation = top_k, routing, activation
        self.plan = plan
        self.gemm = ({"kernel": plan.kernel, "stream_consumers": plan.stream_consumers,
                      "splits": plan.splits} if strict else {})
        # a quantized stack's grouped form reads expert counts on the host: timed eagerly
        self.capturable = not (plan.kernel == moe_ops.GROUPED and w13.format != "dense")

    def replayable(self, fn):
        """fn captured in a CUDA graph (its replay), or fn itself where it cannot be."""
        return graph_of(fn).replay if self.capturable else fn

    def splits(self, r, weights, gated) -> int:
        """The split-K ways this layer's GEMM asks of the tiled kernel (the launcher may run
        fewer where K holds fewer whole x stages); 1 for the other kernels."""
        if self.plan.kernel != "tensor_core":
            return 1
        if self.plan.splits != moe_ops.SPLIT_BY_SHAPE:
            return self.plan.splits
        return moe_ops.gemm_splits(self.x, r, weights, gated)

    def route(self):
        return moe_ops.route(self.logits, self.top_k, self.routing, True, plan=self.plan)

    def w13_gemm(self, r, out=None):
        return moe_ops.expert_gemm(self.x, r, self.w13, input_pairs_per_row=self.top_k,
                                   activation=self.activation, out=out, **self.gemm)

    def w2_gemm(self, r, h, out=None):
        return moe_ops.expert_gemm(h, r, self.w2, input_pairs_per_row=1,
                                   topk_weights=r.topk_weights.view(-1), out=out, **self.gemm)

    def __call__(self):
        r = self.route()
        return moe_ops.moe_sum(self.w2_gemm(r, self.w13_gemm(r)), self.top_k)


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


def run_case(preset, tokens, fmt, weights, variant, args, flush, rate, with_small_ops):
    hidden, _inter, experts, top_k, routing_kind, activation, _ = PRESETS[preset]
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen, device=device).bfloat16()
    logits = torch.randn(tokens, experts, generator=gen, device=device)
    w13, w2 = weights
    plan, strict = variant_plan(variant, tokens * top_k, experts, fmt)
    layer = Layer(x, logits, w13, w2, top_k, routing_kind, activation, plan, strict)
    layer_us = median_event_us(layer.replayable(layer), args.iters, flush)
    host_us = median_host_us(layer, args.iters)

    r = layer.route()
    h = layer.w13_gemm(r)
    y = layer.w2_gemm(r, h)
    ops_us = {}
    timed = [("w13", lambda: layer.w13_gemm(r, out=h)), ("w2", lambda: layer.w2_gemm(r, h, y))]
    if with_small_ops:
        timed = [("route", layer.route), *timed, ("sum", lambda: moe_ops.moe_sum(y, top_k))]
    for name, fn in timed:
        ops_us[name] = round(median_event_us(layer.replayable(fn), args.iters, flush), 2)

    touched = int((r.expert_counts > 0).sum().item())
    splits = {name: layer.splits(r, w, gated)
              for name, w, gated in (("w13", w13, True), ("w2", w2, False))}
    weight_bytes = touched * (expert_bytes(w13) + expert_bytes(w2))
    io_bytes = 2 * tokens * hidden * x.element_size()  # x in, out
    roofline_us = (weight_bytes + io_bytes) / rate * 1e6
    gemm_roofline_us = weight_bytes / rate * 1e6
    return {
        "preset": preset, "tokens": tokens, "weights": fmt, "variant": variant,
        "plan": str(plan), "dtype": "bfloat16", "device": torch.cuda.get_device_name(),
        "layer_us": round(layer_us, 2), "layer_with_host_us": round(host_us, 2),
        "ops_us": ops_us, "kernels": 4 + sum(ways > 1 for ways in splits.values()),
        "block_m": r.block_m, "splits": splits,
        "touched_experts": touched,
        "bytes": weight_bytes + io_bytes, "roofline_us": round(roofline_us, 2),
        "roofline_fraction": round(roofline_us / layer_us, 3),
        "gemm_roofline_fraction": round(gemm_roofline_us / (ops_us["w13"] + ops_us["w2"]), 3),
        "achieved_gbps": round((weight_bytes + io_bytes) / layer_us / 1e3, 1),
    }


def torch_baseline_us(preset, tokens, bf16_weights, args, flush):
    """The grouped_mm bf16 path of one (preset, tokens), or None where torch cannot run it."""
    if args.no_torch or not hasattr(torch, "_grouped_mm"):
        return None
    hidden, _inter, experts, top_k, routing_kind, activation, _ = PRESETS[preset]
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen, device=device).bfloat16()
    logits = torch.randn(tokens, experts, generator=gen, device=device)
    r = moe_ops.route(logits, top_k, routing_kind, True)
    b13, b2 = bf16_weights[0].bias, bf16_weights[1].bias
    base = lambda: torch_layer(x, r, bf16_weights[0].weight, bf16_weights[1].weight, b13, b2,
                               activation)
    try:
        return round(median_event_us(graph_of(base).replay, args.iters, flush), 2)
    except Exception as error:  # noqa: BLE001 - grouped_mm constraints vary by torch version
        print(f"# torch grouped_mm baseline failed: {error}", flush=True)
        return None


def run_preset(preset, args, out_file, rate, records):
    hidden, inter, experts, _top_k, _, _, formats = PRESETS[preset]
    device = torch.device("cuda")
    flush = None if args.warm_l2 else torch.empty(256 << 20, dtype=torch.uint8, device=device)
    bias = preset == "gpt-oss-20b"
    gen = torch.Generator(device=device).manual_seed(0)
    bf16 = (stack("bf16", experts, 2 * inter, hidden, gen, device, bias),
            stack("bf16", experts, hidden, inter, gen, device, bias))
    baseline = {tokens: torch_baseline_us(preset, tokens, bf16, args, flush)
                for tokens in args.tokens}
    for fmt in args.weights or formats:
        weights = bf16 if fmt == "bf16" else (
            stack(fmt, experts, 2 * inter, hidden, gen, device, bias, args.mxfp4_layout),
            stack(fmt, experts, hidden, inter, gen, device, bias, args.mxfp4_layout))
        time.sleep(args.settle_s)
        for tokens in args.tokens:
            for i, variant in enumerate(args.variants):
                try:
                    record = run_case(preset, tokens, fmt, weights, variant, args, flush, rate,
                                      with_small_ops=i == 0)
                except (ValueError, InvalidArgument) as error:  # a strict variant refused it
                    record = {"preset": preset, "tokens": tokens, "weights": fmt,
                              "variant": variant, "error": str(error).splitlines()[0]}
                torch_us = baseline[tokens]
                record["torch_grouped_mm_us"] = torch_us
                if torch_us and "layer_us" in record:
                    record["speedup_vs_grouped_mm"] = round(torch_us / record["layer_us"], 2)
                if fmt == "mxfp4":
                    record["mxfp4_layout"] = args.mxfp4_layout
                records.append(record)
                line = json.dumps(record)
                print(line, flush=True)
                if out_file is not None:
                    out_file.write(line + "\n")
                    out_file.flush()
        del weights
        torch.cuda.empty_cache()


def format_table(records) -> str:
    """Every variant side by side per (preset, weights, tokens): layer us, fraction of the
    roofline, the two GEMMs' fraction of their weight-bytes roofline, and the ratio to the first
    variant's time (> 1: faster)."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    cases = list(dict.fromkeys((r["preset"], r["weights"], r["tokens"]) for r in records))
    by_key = {(r["preset"], r["weights"], r["tokens"], r["variant"]): r for r in records}
    head = f"{'preset':<14} {'weights':<6} {'T':>5}"
    for v in variants:
        head += f" | {v[:16]:>16} {'roof':>5} {'gemm':>5} {'x':>5}"
    lines = [head, "-" * len(head)]
    for preset, fmt, tokens in cases:
        base = by_key.get((preset, fmt, tokens, variants[0]), {}).get("layer_us")
        line = f"{preset:<14} {fmt:<6} {tokens:>5}"
        for v in variants:
            r = by_key.get((preset, fmt, tokens, v), {})
            if "layer_us" not in r:
                line += f" | {'refused':>16} {'':>5} {'':>5} {'':>5}"
                continue
            ratio = base / r["layer_us"] if base else float("nan")
            line += (f" | {r['layer_us']:>13.1f} us {r['roofline_fraction']:>5.2f} "
                     f"{r['gemm_roofline_fraction']:>5.2f} {ratio:>5.2f}")
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["gpt-oss-20b", "qwen3-30b-a3b"],
                        choices=sorted(PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int,
                        default=[1, 8, 16, 32, 64, 128, 512, 2048])
    parser.add_argument("--weights", nargs="+", choices=["bf16", "mxfp4", "fp8"],
                        help="weight formats (default: bf16 and the preset's quantized one)")
    parser.add_argument("--variants", nargs="+", default=["plan"],
                        help="expert GEMM variants: plan, tiles, kernel[:block_m[:consumers]]"
                             " (ratios are to the first)")
    parser.add_argument("--mxfp4-layout", choices=["mma_tiled", "mma"], default="mma_tiled",
                        help="how MXFP4 stacks are stored (default: the engine's 16-row tiles)")
    parser.add_argument("--table", action="store_true",
                        help="print the variants side by side after the JSON lines")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warm-l2", action="store_true", help="do not flush L2 between replays")
    parser.add_argument("--no-torch", action="store_true", help="skip the grouped_mm baseline")
    parser.add_argument("--copy-tbps", type=float, default=None,
                        help="copy rate for the roofline in TB/s (default: by card, 3.0 H100)")
    parser.add_argument("--settle-s", type=float, default=1.0,
                        help="idle seconds before each weight format's cases")
    parser.add_argument("--out", help="append JSON lines to this file")
    args = parser.parse_args(argv)
    for variant in args.variants:
        if variant not in ("plan", "tiles"):
            moe_ops.GemmPlan.parse(variant)  # a typo fails before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit("moelora.bench.moe needs a CUDA GPU")
    rate = copy_rate(torch.cuda.get_device_name(), args.copy_tbps)
    out_file = open(args.out, "a") if args.out else None  # noqa: SIM115
    records = []
    try:
        for preset in args.presets:
            run_preset(preset, args, out_file, rate, records)
    finally:
        if out_file is not None:
            out_file.close()
    if args.table:
        print(format_table(records))
    return records


if __name__ == "__main__":
    main()
