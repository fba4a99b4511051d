"""Attention of prefill chunks through torch's scaled_dot_product_attention.

A sequence with several tokens in the step (a new prompt, a chunk of a long one, the rest of a
prompt after a prefix-cache hit) attends to its cached prefix and to its own new keys. The
paged kernel serves that with one CTA per (token, head), each re-reading the keys from the pool;
torch's fused attention (flash / memory-efficient kernels on a GPU) reads them once per chunk.
So each such span gathers its prefix's K/V from the pool's pages (none for a fresh prompt) and
calls SDPA; decode tokens stay on the paged kernel.

A fresh prompt without a window or sinks takes SDPA's causal path (flash on a GPU, GQA as is).
Otherwise an explicit mask (causal, window) is needed, and K/V are expanded to the query heads
first so that a GPU takes the memory-efficient kernel rather than the O(n * keys * heads)
math fallback. Attention sinks (GPT-OSS: a per-head logit in the softmax denominator only)
become one virtual key seen by every query: two extra head dimensions carry the sink as
hi + lo parts (q side 1/scale, key side the sink), its value row is zero.
Where it pays: on the CPU, SDPA halves TTFT at 1024-token prompts; on a GPU the tensor-core
paged kernel beats the gather + SDPA path (docs/performance.md, "Prefill attention"). The step's
AttentionPlan (ops.plan_attention, field prefill_attention) decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A span's cached prefix up to this many keys is gathered; longer prefixes stay on the paged
# kernel. Bound on the transient memory of one layer: masked spans expand K/V to the query heads
# (gpt-oss: 64 heads x 72 dims x 2 bytes x K and V = 18 KB a key, ~300 MB at 16384 keys), well
# inside the 2 GiB the engine leaves free for activations (moelora.engine.memory).
MAX_GATHERED_KEYS = 1 << 14


@dataclass(frozen=True)
class PrefillSpan:
    """Step tokens [first, first + count) of the sequence in block-table row `seq`, at
    positions [start, start + count) of that sequence."""
    first: int
    count: int
    seq: int
    start: int


def spans_fit(spans, plan) -> bool:
    """Whether the step's prefill spans take SDPA under the step's AttentionPlan."""
    return bool(spans) and plan.prefill_attention == "sdpa"


def first_key(span: PrefillSpan, sliding_window: int) -> int:
    """The earliest key any query of the span sees."""
    return max(0, span.start - sliding_window + 1) if sliding_window else 0


def attend_spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans, scale: float,
                 sliding_window: int, sinks: torch.Tensor | None, out: torch.Tensor,
                 prefix: Callable[[PrefillSpan, int], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """out[first:first+count] = attention of each span's queries over keys [first_key, position]
    (causal, within the window, plus the head's sink logit if any); q and out are [T, H, D], k
    and v [T, KV, D], H a multiple of KV. prefix(span, lo) returns the cached K, V of positions
    [lo, span.start)."""
    for span in spans:
        rows = slice(span.first, span.first + span.count)
        keys, values = k[rows], v[rows]
        lo = first_key(span, sliding_window)
        if span.start > lo:
            k_prefix, v_prefix = prefix(span, lo)
            keys, values = torch.cat([k_prefix, keys]), torch.cat([v_prefix, values])
        queries = q[rows]
        plain = span.start == 0 and sinks is None and not (
            sliding_window and span.count > sliding_window)
        if plain:
            o = F.scaled_dot_product_attention(
                queries.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        else:
            o = _masked(queries, keys, values, span, lo, scale, sliding_window, sinks)
        out[rows] = o.transpose(0, 1)[..., :q.shape[2]]


def _masked(queries, keys, values, span, lo, scale, sliding_window, sinks):
    """SDPA with an explicit causal/window mask over K/V expanded to the query heads; sinks as a
    virtual first key. Returns [H, n, D'] (D' >= D: the sink dimensions are cut by the caller)."""
    heads = queries.shape[1]
    if keys.shape[1] != heads:
        keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
        values = values.repeat_interleave(heads // values.shape[1], dim=1)
    device = queries.device
    q_pos = torch.arange(span.start, span.start + span.count, device=device)[:, None]
    k_pos = torch.arange(lo, span.start + span.count, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window:
        mask &= k_pos > q_pos - sliding_window
    if sinks is not None:
        queries, keys, values, mask = _with_sink_key(queries, keys, values, mask, sinks, scale)
    return F.scaled_dot_product_attention(queries.transpose(0, 1), keys.transpose(0, 1),
                                          values.transpose(0, 1), attn_mask=mask, scale=scale)


# Extra head dimensions for the sink: hi and lo parts, padded so the head stays a multiple of 8.
SINK_DIMS = 8


def _with_sink_key(queries, keys, values, mask, sinks, scale):
    """Adds the virtual key whose logit is sinks[h] for every query of head h and whose value
    is zero; the mask lets every query see it."""
    n, heads, dim = queries.shape
    dtype, device = queries.dtype, queries.device
    sink = sinks.float()
    hi = sink.to(dtype)
    lo = (sink - hi.float()).to(dtype)
    q_extra = torch.zeros(n, heads, SINK_DIMS, dtype=dtype, device=device)
    q_extra[..., :2] = 1.0 / scale
    virtual = torch.zeros(1, heads, dim + SINK_DIMS, dtype=dtype, device=device)
    virtual[0, :, dim] = hi
    virtual[0, :, dim + 1] = lo
    pad = torch.zeros(keys.shape[0], heads, SINK_DIMS, dtype=dtype, device=device)
    keys = torch.cat([virtual, torch.cat([keys, pad], dim=2)])
    values = torch.cat([torch.zeros_like(virtual), torch.cat([values, pad], dim=2)])
    mask = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=device), mask], dim=1)
    return torch.cat([queries, q_extra], dim=2), keys, values, mask
