"""The paged KV cache over the pool's pages: kv_cache_write, paged_attention and the views."""

from __future__ import annotations

import torch

from moelora import _C
from moelora._tensor import CODE_DTYPES, as_optional_ref, as_ref, dtype_code, stream_handle
from moelora.ops.plan import AttentionPlan

KvCacheView = _C.KvCacheView


def kv_page_bytes_needed(block_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one KV page (K then V of block_tokens tokens of one layer), unpadded."""
    return _C.kv_page_bytes_needed(block_tokens, num_kv_heads, head_dim, dtype_code(dtype))


def make_kv_cache_view(
    arena: torch.Tensor,
    *,
    page_bytes: int,
    block_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> KvCacheView:
    """A KvCacheView over a torch-owned byte arena (kept alive by the view)."""
    view = KvCacheView(
        arena=arena.data_ptr(),
        page_bytes=page_bytes,
        block_tokens=block_tokens,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype_code(dtype),
    )
    view._keepalive = (arena,)
    return view


def kv_cache_pages(cache: KvCacheView) -> torch.Tensor:
    """The pages of a view made by make_kv_cache_view as a tensor view (no copy):
    [num_pages, 2 (K, V), block_tokens, num_kv_heads, head_dim] in the cache's dtype."""
    arena = cache._keepalive[0]
    dtype = CODE_DTYPES[cache.dtype]
    shape = (2, cache.block_tokens, cache.num_kv_heads, cache.head_dim)
    kv_bytes = shape[0] * shape[1] * shape[2] * shape[3] * dtype.itemsize
    num_pages = arena.numel() // cache.page_bytes
    pages = arena[: num_pages * cache.page_bytes].view(num_pages, cache.page_bytes)
    return pages[:, :kv_bytes].view(dtype).view(num_pages, *shape)


def kv_cache_write(
    key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, cache: KvCacheView
) -> None:
    """Writes each token's K and V into cache slot slot_mapping[t] (-1 skips the token)."""
    _C.kv_cache_write(
        as_ref(key), as_ref(value), as_ref(slot_mapping), cache, stream_handle(key.device)
    )


def paged_attention(
    query: torch.Tensor,
    query_seq: torch.Tensor,
    query_pos: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cache: KvCacheView,
    scale: float,
    *,
    sliding_window: int = 0,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Causal attention of each query token over its sequence's cached K/V; returns ``out``.
    ``plan``: the step's AttentionPlan, which picks the kernel and split-KV (None: one made for
    this call)."""
    if out is None:
        out = torch.empty_like(query)
    _C.paged_attention(
        as_ref(out),
        as_ref(query),
        as_ref(query_seq),
        as_ref(query_pos),
        as_ref(block_table),
        as_ref(seq_lens),
        cache,
        float(scale),
        int(sliding_window),
        as_optional_ref(sinks),
        stream_handle(query.device),
        plan,
    )
    return out
