"""Float64 torch references and input builders for the layer ops (moelora.ops.layer), shared by
the CPU tests (test_layer_ops.py) and the GPU tests (test_gpu_layer_ops.py)."""

from __future__ import annotations

import torch
from moelora import ops

TOLERANCE = {  # (rtol, atol) of an op's output against the float64 reference
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
BLOCK_TOKENS = 16


def rows(tokens: int, width: int, dtype, gen, *, pad: int = 0, device="cpu") -> torch.Tensor:
    """A [tokens, width] tensor of random normals; with pad > 0 a column slice of a wider one
    (strided rows, as the QKV views are)."""
    full = torch.randn(tokens, width + pad, generator=gen, dtype=torch.float64)
    return full.to(device=device, dtype=dtype)[:, pad // 2: pad // 2 + width]


def rms_norm_ref(h64: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    inv = torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + eps)
    return h64 * inv * weight.double()


def inv_freq_of(rope_type: str, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) of a rope schedule as the models compute it."""
    from moelora.models.config import ModelConfig
    from moelora.models.rope import RotaryEmbedding

    params = {
        "default": {},
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64},
        "yarn": {"factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096},
    }[rope_type]
    config = ModelConfig(architecture="x", family="x", vocab_size=8, hidden_size=8, num_layers=1,
                         num_heads=1, num_kv_heads=1, head_dim=head_dim, intermediate_size=8,
                         rope_type=rope_type, rope_theta=150000.0, rope_params=params,
                         max_position_embeddings=131072)
    rotary = RotaryEmbedding(config)
    return rotary.inv_freq.cpu(), rotary.attention_scaling


def rope_ref(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
             norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """x [T, H, D] (any dtype) normed per head (optional) and rotated, in float64. The angle is
    the float32 product float(p) * inv_freq[i], the op's definition."""
    x64 = x.double().cpu()
    if norm is not None:
        x64 = rms_norm_ref(x64, norm.cpu(), eps)
    freqs = (positions.cpu().float()[:, None] * inv_freq.cpu()[None, :]).double()
    cos = (freqs.cos() * scaling)[:, None, :]
    sin = (freqs.sin() * scaling)[:, None, :]
    half = x64.shape[-1] // 2
    lo, hi = x64[..., :half], x64[..., half:]
    return torch.cat([lo * cos - hi * sin, hi * cos + lo * sin], dim=-1)


def qkv_views(tokens, num_heads, num_kv_heads, head_dim, dtype, gen, device="cpu"):
    """q, k, v as strided views of one fused [T, (Hq + 2 Hkv) * D] tensor (the model's layout)."""
    q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(tokens, q_dim + 2 * kv_dim, generator=gen, dtype=torch.float64)
    qkv = qkv.to(device=device, dtype=dtype)
    q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
    return (q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim),
            v.view(tokens, num_kv_heads, head_dim))


def make_cache(num_pages, num_kv_heads, head_dim, dtype, device="cpu"):
    """A KV cache view over a 0xFF-poisoned arena (NaN in every float dtype)."""
    page_bytes = ops.kv_page_bytes_needed(BLOCK_TOKENS, num_kv_heads, head_dim, dtype) + 256
    arena = torch.full((num_pages * page_bytes,), 0xFF, dtype=torch.uint8, device=device)
    cache = ops.make_kv_cache_view(arena, page_bytes=page_bytes, block_tokens=BLOCK_TOKENS,
                                   num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    return cache, arena, page_bytes


def expected_arena(arena, page_bytes, slot_mapping, k, v):
    """The arena bytes after writing rows k/v [T, Hkv, D] at slot_mapping (-1 skipped), built by
    independent byte indexing."""
    out = arena.cpu().clone()
    tokens, heads, dim = k.shape
    elem = k.element_size()
    half = BLOCK_TOKENS * heads * dim * elem
    row_bytes = heads * dim * elem
    for t in range(tokens):
        slot = int(slot_mapping[t])
        if slot < 0:
            continue
        start = (slot // BLOCK_TOKENS) * page_bytes + (slot % BLOCK_TOKENS) * row_bytes
        out[start:start + row_bytes] = k[t].cpu().contiguous().view(torch.uint8).flatten()
        out[start + half:start + half + row_bytes] = \
            v[t].cpu().contiguous().view(torch.uint8).flatten()
    return out
