"""Attention of prefill chunks through torch's scaled_dot_product_attention.

A sequence with several tokens in the step (a new prompt, a chunk of a long one, the rest of a
prompt after a prefix-cache hit) attends to its cached prefix and to its own new keys. The
paged kernel serves that with one CTA per (token, head), each re-reading the keys from the pool;
torch's fused attention (flash / memory-efficient kernels on a GPU) reads them once per chunk.
So each such span gathers its prefix's K/V from the pool's pages (none for a fresh prompt) and
calls SDPA; decode tokens stay on the paged kernel.

Not taken (the whole layer stays on the paged kernel): attention sinks (GPT-OSS; SDPA has no
per-head denominator term). Benchmarks compare with MOELORA_PREFILL_ATTENTION=paged (every
token on the paged kernel); read at import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A span's cached prefix up to this many keys is gathered (K and V: ~4 KB a key for 8 KV heads
# of 128 in bf16, so <= 256 MB transient per layer); longer prefixes stay on the paged kernel.
MAX_GATHERED_KEYS = 1 << 15


@dataclass(frozen=True)
class PrefillSpan:
    """Step tokens [first, first + count) of step sequence `seq`, at positions [start, start +
    count) of that sequence."""
    first: int
    count: int
    seq: int
    start: int


def _sdpa_enabled() -> bool:
    value = os.environ.get("MOELORA_PREFILL_ATTENTION", "sdpa")
    if value not in ("sdpa", "paged"):
        raise ValueError(f"MOELORA_PREFILL_ATTENTION must be sdpa or paged, got {value!r}")
    return value == "sdpa"


SDPA_ENABLED = _sdpa_enabled()


def spans_fit(spans, sinks) -> bool:
    """Whether this layer takes SDPA for the step's prefill spans."""
    return SDPA_ENABLED and bool(spans) and sinks is None


def first_key(span: PrefillSpan, sliding_window: int) -> int:
    """The earliest key any query of the span sees."""
    return max(0, span.start - sliding_window + 1) if sliding_window else 0


def attend_spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans, scale: float,
                 sliding_window: int, out: torch.Tensor,
                 prefix: Callable[[PrefillSpan, int], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """out[first:first+count] = attention of each span's queries over keys [first_key, position]
    (causal, within the window); q and out are [T, H, D], k and v [T, KV, D], H a multiple of
    KV. prefix(span, lo) returns the cached K, V of positions [lo, span.start)."""
    gqa = q.shape[1] != k.shape[1]
    for span in spans:
        rows = slice(span.first, span.first + span.count)
        keys, values = k[rows], v[rows]
        lo = first_key(span, sliding_window)
        if span.start > lo:
            k_prefix, v_prefix = prefix(span, lo)
            keys, values = torch.cat([k_prefix, keys]), torch.cat([v_prefix, values])
        mask = None
        if span.start > 0 or (sliding_window and span.count > sliding_window):
            q_pos = torch.arange(span.start, span.start + span.count, device=q.device)[:, None]
            k_pos = torch.arange(lo, span.start + span.count, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window:
                mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)
        out[rows] = o.transpose(0, 1)
