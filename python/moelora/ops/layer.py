"""The decoder layer's own ops: RMSNorm, the residual add fused into it, and rotary embeddings
(with Qwen3's per-head q/k norm) fused with the paged KV-cache write.

Thin wrappers over ``moelora._C``; semantics and argument rules: include/moelora/layer.h.
Import as ``from moelora.ops import layer as layer_ops``.
"""

from __future__ import annotations

import torch

from moelora import _C
from moelora._tensor import as_optional_ref, as_ref, stream_handle

ROPE_MAX_HEAD_DIM: int = _C.ROPE_MAX_HEAD_DIM


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, H] = x / sqrt(mean(x^2) + eps) * weight (float32 math); returns out. A float32
    weight with 16-bit activations multiplies before the rounding (GPT-OSS), a weight of the
    activation dtype after it (Llama). out may be x."""
    if out is None:
        out = torch.empty_like(x)
    _C.rms_norm(as_ref(x), as_ref(weight), float(eps), as_ref(out), stream_handle(x.device))
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """residual += x (in place, rounded to its dtype); returns out = rms_norm(residual)."""
    if out is None:
        out = torch.empty_like(x)
    _C.add_rms_norm(as_ref(x), as_ref(residual), as_ref(weight), float(eps), as_ref(out),
                    stream_handle(x.device))
    return out


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
            attention_scaling: float = 1.0, q_norm: torch.Tensor | None = None,
            k_norm: torch.Tensor | None = None, norm_eps: float = 0.0) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place (rotate-half) at int64 `positions`, after
    the per-head RMSNorm q_norm / k_norm [D] when given."""
    _C.rope_qk(as_ref(q), as_ref(k), as_ref(positions), as_ref(inv_freq),
               float(attention_scaling), as_optional_ref(q_norm), as_optional_ref(k_norm),
               float(norm_eps), stream_handle(q.device))


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, slot_mapping: torch.Tensor, cache,
                  attention_scaling: float = 1.0, q_norm: torch.Tensor | None = None,
                  k_norm: torch.Tensor | None = None, norm_eps: float = 0.0) -> None:
    """rope_qk, and each token's rotated key and value written to cache slot slot_mapping[t]
    (int64 [T]; -1 skips the write) of `cache` (a KvCacheView), in one kernel."""
    _C.rope_kv_write(as_ref(q), as_ref(k), as_ref(v), as_ref(positions), as_ref(inv_freq),
                     float(attention_scaling), as_optional_ref(q_norm), as_optional_ref(k_norm),
                     float(norm_eps), as_ref(slot_mapping), cache, stream_handle(q.device))


__all__ = ["ROPE_MAX_HEAD_DIM", "add_rms_norm", "rms_norm", "rope_kv_write", "rope_qk"]
