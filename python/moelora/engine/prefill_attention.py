"""Attention of fresh prefills through torch's scaled_dot_product_attention.

A sequence whose step tokens start at position 0 (a new prompt, or the first chunk of one)
attends only to its own new keys, which the step has in hand: no page needs reading, and
torch's fused attention (flash / memory-efficient on a GPU) does in one pass what the paged
kernel does with one CTA per (token, head) re-reading the keys from the pool. Every other token
(decode, later prefill chunks, prefix-cache hits) goes through the paged kernel.

Not taken (the whole layer stays on the paged kernel): attention sinks (GPT-OSS; SDPA has no
per-head denominator term) and a sliding window shorter than a fresh span. Benchmarks compare
with MOELORA_PREFILL_ATTENTION=paged (every token on the paged kernel); read at import.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def _sdpa_enabled() -> bool:
    value = os.environ.get("MOELORA_PREFILL_ATTENTION", "sdpa")
    if value not in ("sdpa", "paged"):
        raise ValueError(f"MOELORA_PREFILL_ATTENTION must be sdpa or paged, got {value!r}")
    return value == "sdpa"


SDPA_ENABLED = _sdpa_enabled()


def fresh_spans_fit(spans, sliding_window: int, sinks) -> bool:
    """Whether this layer can take SDPA for the step's fresh spans."""
    if not SDPA_ENABLED or not spans or sinks is not None:
        return False
    return not sliding_window or all(n <= sliding_window for _, n in spans)


def attend_fresh_spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans, scale: float,
                       out: torch.Tensor) -> None:
    """out[s0:s0+n] = causal attention of q over k, v within each span (s0, n); q and out are
    [T, H, D], k and v [T, KV, D] with H a multiple of KV (grouped-query attention)."""
    gqa = q.shape[1] != k.shape[1]
    for s0, n in spans:
        o = F.scaled_dot_product_attention(
            q[s0:s0 + n].transpose(0, 1), k[s0:s0 + n].transpose(0, 1),
            v[s0:s0 + n].transpose(0, 1), is_causal=True, scale=scale, enable_gqa=gqa)
        out[s0:s0 + n] = o.transpose(0, 1)
