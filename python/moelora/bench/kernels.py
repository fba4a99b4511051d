"""One MoE layer's whole LoRA delta (align + w13 + w2) on the GPU, per BENCHMARKS.md.

    python -m moelora.bench.kernels --presets gpt-oss-20b --tokens 1 8 128 --adapters 4 16 \
        --ranks 16 mixed --out bench/results/h200-kernels.jsonl

Per case: the LoRA delta captured in a CUDA graph and replayed (CUDA events, median, L2 flushed
before each replay unless --warm-l2), the same calls eager with a host clock (lora_with_host_us),
the roofline (BENCHMARKS.md byte formula over 4.18 TB/s), and the base experts on the same
routing (torch grouped_mm on expert-sorted rows; timed after all of a preset's LoRA cases, so no
LoRA case follows their GEMMs). Each case runs the step's plan (ops.plan_lora, as the engine
makes it), with --plan's overrides (PlanOverrides syntax, e.g. "lora_kernel=splitk,block_m=32")
on top; the record carries the plan. One JSON line per case on stdout, appended to --out when
given (a preset's lines once its base is timed). LoRA rows live in one uint8 arena per site,
read through row tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from moelora import ops

PRESETS = {  # hidden, inter (per expert), experts, top_k
    "gpt-oss-20b": (2880, 2880, 32, 4),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
}
COPY_BANDWIDTH = 4.18e12  # bytes/s, BENCHMARKS.md
MIXED_RANKS = [8, 16, 32, 64]
# vLLM 0.33.0 fused_moe_lora (Triton) on this H200, rank 16: (preset, tokens, adapters) -> us.
PEER_US = {
    ("gpt-oss-20b", 1, 4): 51, ("gpt-oss-20b", 8, 4): 59, ("gpt-oss-20b", 32, 4): 87,
    ("gpt-oss-20b", 128, 4): 114, ("gpt-oss-20b", 512, 4): 160, ("gpt-oss-20b", 2048, 4): 219,
    ("gpt-oss-20b", 8192, 4): 595, ("gpt-oss-20b", 1, 16): 52, ("gpt-oss-20b", 8, 16): 56,
    ("gpt-oss-20b", 32, 16): 108, ("gpt-oss-20b", 128, 16): 170, ("gpt-oss-20b", 512, 16): 371,
    ("gpt-oss-20b", 2048, 16): 420, ("gpt-oss-20b", 8192, 16): 686,
    ("qwen3-30b-a3b", 1, 4): 26, ("qwen3-30b-a3b", 8, 4): 34, ("qwen3-30b-a3b", 32, 4): 59,
    ("qwen3-30b-a3b", 128, 4): 88, ("qwen3-30b-a3b", 512, 4): 182,
    ("qwen3-30b-a3b", 2048, 4): 212, ("qwen3-30b-a3b", 8192, 4): 504,
    ("qwen3-30b-a3b", 1, 16): 26, ("qwen3-30b-a3b", 8, 16): 35, ("qwen3-30b-a3b", 32, 16): 54,
    ("qwen3-30b-a3b", 128, 16): 161, ("qwen3-30b-a3b", 512, 16): 478,
    ("qwen3-30b-a3b", 2048, 16): 600, ("qwen3-30b-a3b", 8192, 16): 729,
    ("mixtral-8x7b", 1, 4): 150, ("mixtral-8x7b", 8, 4): 126, ("mixtral-8x7b", 32, 4): 189,
    ("mixtral-8x7b", 128, 4): 229, ("mixtral-8x7b", 512, 4): 324, ("mixtral-8x7b", 2048, 4): 561,
    ("mixtral-8x7b", 1, 16): 154, ("mixtral-8x7b", 8, 16): 206, ("mixtral-8x7b", 32, 16): 283,
    ("mixtral-8x7b", 128, 16): 321, ("mixtral-8x7b", 512, 16): 356,
    ("mixtral-8x7b", 2048, 16): 545,
}


class SiteArena:
    """Every slot's A and B^T rows of one site, max_rank rows each, in one uint8 arena."""

    def __init__(self, slots, experts, max_rank, in_dim, out_dim, dtype, device):
        elem = torch.empty((), dtype=dtype).element_size()
        per_group = max_rank * (in_dim + out_dim) * elem
        self.arena = torch.empty(slots * experts * per_group, dtype=torch.uint8, device=device)
        self.arena.view(dtype).normal_(0.0, 0.02)
        group = torch.arange(slots * experts, device=device, dtype=torch.int64).view(slots, experts, 1, 1)
        r = torch.arange(max_rank, device=device, dtype=torch.int64)
        a_off = group * per_group + r * in_dim * elem
        b_off = group * per_group + max_rank * in_dim * elem + r * out_dim * elem
        self.table = torch.cat([a_off, b_off], dim=2).reshape(slots, -1).contiguous()
        self.shape = (experts, max_rank, in_dim, out_dim, dtype)

    def view(self, ranks):
        experts, max_rank, in_dim, out_dim, dtype = self.shape
        return ops.make_site_view(
            self.arena, self.table, ranks.view(-1, 1), num_experts=experts, max_rank=max_rank,
            in_dim=in_dim, out_dim=out_dim, dtype=dtype,
        )


def route(tokens, experts, top_k, gen, device):
    logits = torch.randn(tokens, experts, generator=gen, device=device)
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return ids.to(torch.int32), (weights / weights.sum(-1, keepdim=True)).reshape(-1).float()


def make_layer_inputs(preset, tokens, gen, device, dtype):
    """Routing and activations of one MoE layer: (topk ids, flat routing weights, x [T, H],
    h [P, I], h13 [P, 2I], y [P, H])."""
    hidden, inter, experts, top_k = PRESETS[preset]
    ids, weights = route(tokens, experts, top_k, gen, device)
    pairs = tokens * top_k
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    h = torch.randn(pairs, inter, generator=gen, device=device).to(dtype)
    h13 = torch.randn(pairs, 2 * inter, generator=gen, device=device).to(dtype)
    y = torch.randn(pairs, hidden, generator=gen, device=device).to(dtype)
    return ids, weights, x, h, h13, y


def layer_arenas(preset, slots, max_rank, dtype, device):
    """The gate, up and down SiteArenas of one MoE layer of `preset`."""
    hidden, inter, experts, _ = PRESETS[preset]
    return [SiteArena(slots, experts, max_rank, i, o, dtype, device)
            for i, o in [(hidden, inter), (hidden, inter), (inter, hidden)]]


def layer_views(arenas, ranks):
    """(w13 views, w2 views) of layer_arenas at per-slot `ranks` (an int32 tensor)."""
    gate, up, down = arenas
    return [gate.view(ranks), up.view(ranks)], [down.view(ranks)]


def layer_inputs(preset, tokens, dtype, device):
    """make_layer_inputs from a generator seeded by the token count, so a token count gets the
    same routing and activations wherever they are drawn; returns (generator, inputs), the
    generator ready for the slot draws."""
    gen = torch.Generator(device=device).manual_seed(tokens)
    return gen, make_layer_inputs(preset, tokens, gen, device, dtype)


def draw_slots(tokens, adapters, popularity, gen, device, base_fraction=0.1):
    if popularity == "zipf":
        p = torch.tensor([1.0 / (i + 1) for i in range(adapters)], device=device)
        slots = torch.multinomial(p, tokens, replacement=True, generator=gen)
    else:
        slots = torch.randint(0, adapters, (tokens,), generator=gen, device=device)
    base = torch.rand(tokens, generator=gen, device=device) < base_fraction
    if tokens > 1:
        base[0] = False
    return torch.where(base, torch.full_like(slots, -1), slots).to(torch.int32)


def median_event_us(fn, iters, flush=None):
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def median_host_us(fn, iters):
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def graph_of(fn):
    fn()  # warm-up: module load, attributes, allocator pools
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def base_experts_us(x, h, ids, w13, w2, iters, flush):
    """Base experts w13 and w2 on expert-sorted rows: torch grouped_mm (or a per-expert loop)."""
    top_k = ids.shape[1]
    order = ids.reshape(-1).argsort(stable=True)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=w13.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    x_sorted = x[order // top_k].contiguous()
    h_sorted = h[order].contiguous()
    grouped = getattr(torch, "_grouped_mm", None)

    def run_grouped():
        grouped(x_sorted, w13, offs=offs)
        grouped(h_sorted, w2, offs=offs)

    bounds = [0] + offs.tolist()

    def run_loop():
        for e in range(w13.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                x_sorted[lo:hi] @ w13[e]
                h_sorted[lo:hi] @ w2[e]

    for fn in ([run_grouped] if grouped is not None else []) + [run_loop]:
        try:
            graph = graph_of(fn)
            return median_event_us(graph.replay, iters, flush), fn.__name__
        except Exception as error:  # noqa: BLE001 - grouped_mm constraints vary by torch version
            print(f"# base experts: {fn.__name__} failed: {error}", flush=True)
    return float("nan"), "none"


def make_lora_delta(ids, token_slot, weights, x, h, h13, y, views13, views2, experts, slots,
                    inter, plan, form, num_adapters=None):
    """One MoE layer's LoRA delta under `plan`: align once, then w13 (gate and up) and w2
    (down); or, in the unsorted form (decode), w13 and w2 straight from the routing."""
    top_k = ids.shape[1]

    if form == "unsorted":
        def lora_delta():
            ops.fused_moe_lora_unsorted(x, h13, ids, token_slot, views13, [0, inter],
                                        input_pairs_per_row=top_k, plan=plan)
            ops.fused_moe_lora_unsorted(h, y, ids, token_slot, views2, [0],
                                        input_pairs_per_row=1, topk_weights=weights, plan=plan)
        return lora_delta

    block_m = plan.block_m

    def lora_delta():
        meta = ops.moe_lora_align(ids, token_slot, experts, slots, block_m, plan=plan)
        ops.fused_moe_lora(x, h13, *meta, block_m, views13, [0, inter], input_pairs_per_row=top_k,
                           num_adapters=num_adapters, plan=plan)
        ops.fused_moe_lora(h, y, *meta, block_m, views2, [0], input_pairs_per_row=1,
                           topk_weights=weights, num_adapters=num_adapters, plan=plan)

    return lora_delta


def run_preset(preset, args, out_file):
    """Every LoRA case of the preset, then the base experts of each token count, then the lines.
    The base comes last because LoRA cases timed right after ~1 ms of grouped_mm GEMMs read
    5-18% slower than the same code timed alone (GPU clocks after heavy GEMMs)."""
    dtype, device = getattr(torch, args.dtype), torch.device("cuda")
    max_rank = max(MIXED_RANKS if "mixed" in args.ranks else [int(r) for r in args.ranks])
    arenas = layer_arenas(preset, max(args.adapters), max_rank, dtype, device)
    flush = None if args.warm_l2 else torch.empty(256 << 20, dtype=torch.uint8, device=device)
    time.sleep(args.settle_s)  # after the previous preset's GEMMs
    records = []
    for tokens in args.tokens:
        records += lora_cases(preset, tokens, args, arenas, flush)
    base = {}
    if not args.no_base:
        del arenas
        base = base_times(preset, args, flush)
    for record in records:
        base_us, base_impl = base.get(record["tokens"], (float("nan"), "skipped"))
        record["base_us"], record["base_impl"] = round(base_us, 2), base_impl
        record["lora_over_base"] = (round(record["lora_us"] / base_us, 3)
                                    if not math.isnan(base_us) else None)
        line = json.dumps(record)
        print(line, flush=True)
        if out_file is not None:
            out_file.write(line + "\n")
            out_file.flush()


def base_times(preset, args, flush):
    """tokens -> (median us, implementation) of the base experts on that token count's routing."""
    hidden, inter, experts, _ = PRESETS[preset]
    dtype, device = getattr(torch, args.dtype), torch.device("cuda")
    w13 = (torch.randn(experts, hidden, 2 * inter, device=device) * 0.02).to(dtype)
    w2 = (torch.randn(experts, inter, hidden, device=device) * 0.02).to(dtype)
    times = {}
    for tokens in args.tokens:
        _, (ids, _, x, h, _, _) = layer_inputs(preset, tokens, dtype, device)
        times[tokens] = base_experts_us(x, h, ids, w13, w2, args.iters, flush)
    return times


def lora_cases(preset, tokens, args, arenas, flush):
    """One record per (adapters, rank, popularity) at this token count, base fields unset.
    arenas: the gate, up and down SiteArenas of max(args.adapters) slots."""
    hidden, inter, experts, top_k = PRESETS[preset]
    device = torch.device("cuda")
    max_slots = max(args.adapters)
    name = torch.cuda.get_device_name(device)
    gen, (ids, weights, x, h, h13, y) = layer_inputs(preset, tokens, getattr(torch, args.dtype),
                                                     device)
    pairs = tokens * top_k
    records = []
    for adapters, rank, popularity in [
        (a, r, p) for a in args.adapters for r in args.ranks for p in args.popularity
    ]:
        if rank == "mixed":
            slot_rank = [MIXED_RANKS[s % len(MIXED_RANKS)] for s in range(max_slots)]
        else:
            slot_rank = [int(rank)] * max_slots
        ranks = torch.tensor(slot_rank, dtype=torch.int32, device=device)
        views13, views2 = layer_views(arenas, ranks)
        token_slot = draw_slots(tokens, adapters, popularity, gen, device)
        used = len({s for s in token_slot.tolist() if s >= 0})
        plan = ops.plan_lora(pairs, num_experts=experts, num_adapters=used, dtype=x.dtype,
                             device=device, overrides=args.overrides)
        forms = {"auto": [plan.form], "both": ["grouped", "unsorted"]}.get(args.form, [args.form])
        timed = {}
        for form in forms:
            lora_delta = make_lora_delta(
                ids, token_slot, weights, x, h, h13, y, views13, views2, experts, max_slots,
                inter, plan, form, num_adapters=used,
            )
            graph = graph_of(lora_delta)
            timed[form] = (median_event_us(graph.replay, args.iters, flush),
                           median_host_us(lora_delta, args.iters))
        form = min(timed, key=lambda f: timed[f][0])
        lora_us, host_us = timed[form]

        slot_of_pair = token_slot.long().repeat_interleave(top_k)
        used = slot_of_pair >= 0
        groups = torch.unique(slot_of_pair[used] * experts + ids.reshape(-1).long()[used])
        rank_sum = sum(slot_rank[int(g) // experts] for g in groups.tolist())
        lora_bytes = rank_sum * (2 * hidden + 3 * inter) * 2
        act_bytes = tokens * hidden * 2 + pairs * (2 * inter * 4 + inter * 2 + hidden * 4)
        roofline_us = (lora_bytes + act_bytes) / COPY_BANDWIDTH * 1e6
        peer = PEER_US.get((preset, tokens, adapters)) if rank == "16" else None
        record = {
            "preset": preset, "tokens": tokens, "adapters": adapters, "rank": rank,
            "popularity": popularity, "dtype": args.dtype, "device": name,
            "lora_us": round(lora_us, 2), "lora_with_host_us": round(host_us, 2),
            "roofline_us": round(roofline_us, 2),
            "roofline_fraction": round(roofline_us / lora_us, 3),
            "base_us": None, "base_impl": None, "lora_over_base": None,  # run_preset
            "peer_us": peer, "speedup_vs_peer": round(peer / lora_us, 2) if peer else None,
            "block_m": plan.block_m, "groups": int(groups.numel()),
            "cold_l2": flush is not None, "form": form, "kernel_family": plan.lora_kernel,
            "plan": repr(plan),
            **({f"{f}_us": round(t[0], 2) for f, t in timed.items()} if len(timed) > 1 else {}),
        }
        records.append(record)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32, 128, 512, 2048, 8192])
    parser.add_argument("--adapters", nargs="+", type=int, default=[4, 16, 64])
    parser.add_argument("--ranks", nargs="+", default=["8", "16", "64", "mixed"])
    parser.add_argument("--popularity", nargs="+", default=["uniform", "zipf"], choices=["uniform", "zipf"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warm-l2", action="store_true", help="do not flush L2 between replays")
    parser.add_argument("--no-base", action="store_true", help="skip the base experts timing")
    parser.add_argument("--form", default="auto", choices=["auto", "grouped", "unsorted", "both"],
                        help="auto: the plan's form (the engine's choice); both: time the two "
                             "forms and report the faster (both times in the line)")
    parser.add_argument("--plan", default="",
                        help="plan overrides, key=value[,...] (ops.PlanOverrides.parse: "
                             "lora_kernel, block_m, cluster_max, mma_split, align_kernel, pdl)")
    parser.add_argument("--settle-s", type=float, default=1.0,
                        help="idle seconds before each preset's LoRA cases (GPU clocks settle "
                             "after the previous preset's base GEMMs)")
    parser.add_argument("--out", help="append JSON lines to this file")
    args = parser.parse_args(argv)
    args.overrides = ops.PlanOverrides.parse(args.plan)
    if not torch.cuda.is_available():
        raise SystemExit("moelora.bench.kernels needs a CUDA GPU")
    out_file = open(args.out, "a") if args.out else None  # noqa: SIM115
    try:
        for preset in args.presets:
            run_preset(preset, args, out_file)
            torch.cuda.empty_cache()
    finally:
        if out_file is not None:
            out_file.close()


if __name__ == "__main__":
    main()
