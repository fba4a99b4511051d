"""Where a MoE model's numbers part from a reference, per layer and op, in one run.

Runs the same synthetic model twice on one prompt: a reference (default: float32 on the CPU, the
reference ops) and a test (default: bfloat16 on the GPU, the fused kernels), records every
layer's attention output, MoE output and routing, then prints per layer the relative error of
each against the reference and every token whose top-k set differs, with the reference's
logit margin at the boundary (a margin below the test dtype's resolution is a near-tie: an
honest rounding effect, not a kernel bug). A second reference pass follows the test's routing,
so the remaining error is the kernels' own.

    python -m moelora.bench.moe_parity --preset tiny-moe --expert-weights mxfp4 --layers 2
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field

import torch

from moelora.models import ReferenceContext
from moelora.ops import moe as moe_ops

# A near-tie: the reference's margin between the sets is below this fraction of its largest
# logit (bfloat16 keeps 8 bits: one rounding of a logit moves it by up to 2^-9 of itself).
NEAR_TIE = 2.0 ** -6


@dataclass
class Trace:
    """What one forward pass recorded, per layer index."""

    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    moe: dict[int, torch.Tensor] = field(default_factory=dict)
    router_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    topk_ids: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None


@dataclass
class Row:
    layer: int | None
    site: str
    relative_error: float
    note: str = ""


def _routers(model):
    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        router = getattr(mlp, getattr(mlp, "router_name", ""), None)
        if router is not None and hasattr(router, "route"):
            yield index, layer, router


def _forced_route(router, ids: torch.Tensor):
    """A Router.route that picks `ids` [T, K] (best first) and weighs them from its own logits
    by its own rule, whatever its logits would pick."""
    def route(x, block_m=None):
        logits = torch.nn.functional.linear(x, router.weight, router.bias).float()
        chosen = ids.to(logits.device).long()
        # route over logits that rank exactly `ids` first (in their order), then reweigh
        ranks = torch.full_like(logits, -1e30)
        ranks.scatter_(1, chosen, torch.arange(chosen.shape[1], 0, -1, dtype=logits.dtype,
                                               device=logits.device).expand_as(chosen))
        plan = moe_ops.plan_expert_gemm(x.shape[0] * router.top_k, router.num_experts,
                                        router.expert_format)
        routing = moe_ops.route(ranks, router.top_k, router.kind, router.renorm, block_m, plan)
        picked = logits.gather(1, chosen)
        if router.kind == "topk_softmax":
            weights = torch.softmax(picked, dim=1)
        else:
            weights = torch.softmax(logits, dim=1).gather(1, chosen)
            if router.renorm:
                weights = weights / weights.sum(1, keepdim=True)
        routing.topk_weights.copy_(weights)
        return routing
    return route


def trace(model, input_ids: torch.Tensor, positions: torch.Tensor,
          force: dict[int, torch.Tensor] | None = None) -> Trace:
    """One forward pass of `model` (a fresh ReferenceContext, one sequence), recorded; `force`
    imposes each listed layer's top-k ids."""
    out = Trace()
    hooks, wrapped = [], []
    for index, layer, router in _routers(model):
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, o, i=index: out.attention.__setitem__(i, o.detach().float().cpu())))
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, a, o, i=index: out.moe.__setitem__(i, o.detach().float().cpu())))
        inner = _forced_route(router, force[index]) if force and index in force else \
            router.route

        def keep(x, block_m=None, inner=inner, router=router, index=index):
            logits = torch.nn.functional.linear(x, router.weight, router.bias)
            out.router_logits[index] = logits.detach().float().cpu()
            routing = inner(x, block_m)
            out.topk_ids[index] = routing.topk_ids.detach().long().cpu()
            return routing
        router.route = keep
        wrapped.append(router)
    try:
        ctx = ReferenceContext()
        ctx.begin_step(torch.zeros_like(positions), positions)
        device = next(model.parameters()).device
        with torch.no_grad():
            out.logits = model(input_ids.to(device), positions.to(device), ctx).float().cpu()
    finally:
        for hook in hooks:
            hook.remove()
        for router in wrapped:
            del router.route
    return out


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def routing_differences(ref: Trace, test: Trace, layer: int) -> list[tuple[int, float]]:
    """(token, margin / largest |logit|) for each token whose top-k set differs: the margin is
    the reference's logit of its own k-th choice minus the best logit among the test's choices
    it did not take."""
    found = []
    logits = ref.router_logits[layer]
    want, got = ref.topk_ids[layer], test.topk_ids[layer]
    for t in range(want.shape[0]):
        mine, theirs = set(want[t].tolist()), set(got[t].tolist())
        if mine == theirs:
            continue
        kth = min(logits[t, e].item() for e in mine)
        intruder = max(logits[t, e].item() for e in theirs - mine)
        scale = logits[t].abs().max().clamp_min(1e-30).item()
        found.append((t, (kth - intruder) / scale))
    return found


def compare(ref: Trace, test: Trace) -> list[Row]:
    rows = []
    for layer in sorted(ref.moe):
        rows.append(Row(layer, "attention", _relative(test.attention[layer],
                                                      ref.attention[layer])))
        differences = routing_differences(ref, test, layer)
        note = ", ".join(f"token {t} margin {m:.1e}" for t, m in differences)
        rows.append(Row(layer, "router logits", _relative(test.router_logits[layer],
                                                          ref.router_logits[layer]),
                        f"top-k differs: {note}" if note else ""))
        rows.append(Row(layer, "moe", _relative(test.moe[layer], ref.moe[layer])))
    rows.append(Row(None, "logits", _relative(test.logits, ref.logits)))
    return rows


def near_ties_only(ref: Trace, test: Trace) -> list[str]:
    """The routing differences that are not near-ties (empty when every one is)."""
    bad = []
    for layer in sorted(ref.topk_ids):
        for t, margin in routing_differences(ref, test, layer):
            if margin > NEAR_TIE:
                bad.append(f"layer {layer} token {t}: margin {margin:.2e}")
    return bad


def run(preset: str, expert_weights: str, layers: int, tokens: int, test_device: str,
        test_dtype: torch.dtype, seed: int = 1) -> tuple[list[Row], list[Row], Trace, Trace]:
    """(rows against the free reference, rows against the reference on the test's routing,
    reference trace, test trace)."""
    from moelora.models.synthetic import build_synthetic

    reference = build_synthetic(preset, dtype=torch.float32, num_layers=layers,
                                expert_weights=expert_weights)
    test = copy.deepcopy(reference)
    for name, param in test.named_parameters():  # FP8 block scales stay float32
        if param.dtype == torch.float32 and not name.endswith("_scale_inv"):
            param.data = param.data.to(test_dtype)
    test = test.to(test_device)
    vocab = reference.config.vocab_size
    ids = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(tokens)
    ref_trace = trace(reference, ids, positions)
    test_trace = trace(test, ids, positions)
    forced = trace(reference, ids, positions, force=test_trace.topk_ids)
    return compare(ref_trace, test_trace), compare(forced, test_trace), ref_trace, test_trace


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'layer':>5}  {'site':<14} {'rel error':>10}  note"]
    for r in rows:
        layer = "-" if r.layer is None else str(r.layer)
        lines.append(f"{layer:>5}  {r.site:<14} {r.relative_error:>10.2e}  {r.note}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--expert-weights", default="mxfp4", choices=["dense", "mxfp4", "fp8"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=37)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    free, forced, ref, test = run(args.preset, args.expert_weights, args.layers, args.tokens,
                                  args.device, getattr(torch, args.dtype))
    print(f"# {args.preset} {args.expert_weights} experts, {args.layers} layers, "
          f"{args.tokens} tokens: {args.dtype} on {args.device} against float32 on the CPU")
    print(format_rows(free))
    print("# the same, the reference following the test's routing (the kernels' own error)")
    print(format_rows(forced))
    bad = near_ties_only(ref, test)
    print("# routing differences that are not near-ties: " + ("; ".join(bad) if bad else
                                                              "none"))


if __name__ == "__main__":
    main()
