"""kv_cache_write and paged_attention on the CPU against a float64 dense-causal reference."""

from __future__ import annotations

import math

import moelora
import pytest
import torch
from moelora import ops

TOLERANCE = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}
BLOCK_TOKENS = 16


def build_cache(seq_lens, num_kv_heads, head_dim, dtype, gen):
    """A paged cache with pages assigned at random, written through kv_cache_write.

    Returns the view, the block table, and each sequence's dense float64 K and V.
    """
    max_blocks = max(-(-n // BLOCK_TOKENS) for n in seq_lens) + 1
    total_blocks = sum(-(-n // BLOCK_TOKENS) for n in seq_lens)
    num_pages = total_blocks + 5  # spare pages stay NaN: reading one poisons the output
    page_bytes = ops.kv_page_bytes_needed(BLOCK_TOKENS, num_kv_heads, head_dim, dtype) + 256
    arena = torch.full((num_pages * page_bytes,), 0xFF, dtype=torch.uint8)
    cache = ops.make_kv_cache_view(
        arena, page_bytes=page_bytes, block_tokens=BLOCK_TOKENS, num_kv_heads=num_kv_heads,
        head_dim=head_dim, dtype=dtype,
    )
    pages = torch.randperm(num_pages, generator=gen).tolist()
    block_table = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    keys, values, slots = [], [], []
    for s, n in enumerate(seq_lens):
        for b in range(-(-n // BLOCK_TOKENS)):
            block_table[s, b] = pages.pop()
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
        keys.append(k)
        values.append(v)
        slots += [int(block_table[s, j // BLOCK_TOKENS]) * BLOCK_TOKENS + j % BLOCK_TOKENS for j in range(n)]
    all_k, all_v = torch.cat(keys), torch.cat(values)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    # Write in a shuffled order, plus a skipped token (-1), with non-contiguous key rows.
    order = torch.randperm(len(slots), generator=gen)
    k_in = torch.cat([all_k[order], torch.zeros(1, num_kv_heads, head_dim, dtype=dtype)])
    v_in = torch.cat([all_v[order], torch.zeros(1, num_kv_heads, head_dim, dtype=dtype)])
    k_strided = torch.cat([k_in, k_in], dim=2)[:, :, :head_dim]
    ops.kv_cache_write(k_strided, v_in, torch.cat([slot_mapping[order], torch.tensor([-1])]), cache)
    return cache, arena, page_bytes, block_table, keys, values


def read_back(arena, page_bytes, page, offset, num_kv_heads, head_dim, dtype, is_value):
    """K or V of one cached token, read straight from the arena bytes (independent indexing)."""
    elem = torch.empty((), dtype=dtype).element_size()
    half = BLOCK_TOKENS * num_kv_heads * head_dim * elem
    start = page * page_bytes + (half if is_value else 0) + offset * num_kv_heads * head_dim * elem
    raw = arena[start : start + num_kv_heads * head_dim * elem].clone()
    return raw.view(dtype).view(num_kv_heads, head_dim)


def reference(q64, keys, values, query_seq, query_pos, seq_lens, scale, window, sinks):
    num_heads = q64.shape[1]
    out = torch.zeros_like(q64)
    for t in range(q64.shape[0]):
        s, pos = int(query_seq[t]), int(query_pos[t])
        k, v = keys[s].double(), values[s].double()
        ratio = num_heads // k.shape[1]
        j = torch.arange(seq_lens[s])
        visible = j <= pos
        if window > 0:
            visible &= j > pos - window
        for h in range(num_heads):
            logits = (k[:, h // ratio] @ q64[t, h]) * scale
            logits = logits[visible]
            if logits.numel() == 0:
                continue
            m = logits.max()
            if sinks is not None:
                m = torch.maximum(m, torch.tensor(float(sinks[h]), dtype=torch.float64))
            p = torch.exp(logits - m)
            denom = p.sum() + (math.exp(float(sinks[h]) - m) if sinks is not None else 0.0)
            out[t, h] = (p[:, None] * v[visible][:, h // ratio]).sum(0) / denom
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "gqa,head_dim,window,use_sinks",
    [(1, 64, 0, False), (4, 36, 0, True), (4, 64, 20, False), (1, 36, 7, True)],
)
def test_paged_attention_matches_dense_reference(dtype, gqa, head_dim, window, use_sinks):
    gen = torch.Generator().manual_seed(head_dim * 10 + gqa + window)
    num_kv_heads = 2
    num_heads = num_kv_heads * gqa
    seq_lens = [1, 37, 16, 75]
    cache, arena, page_bytes, block_table, keys, values = build_cache(
        seq_lens, num_kv_heads, head_dim, dtype, gen
    )
    # The cache holds exactly what was written, at the block table's pages.
    for s, n in enumerate(seq_lens):
        for j in (0, n - 1):
            page = int(block_table[s, j // BLOCK_TOKENS])
            got = read_back(arena, page_bytes, page, j % BLOCK_TOKENS, num_kv_heads, head_dim, dtype, True)
            assert torch.equal(got, values[s][j])
    # Decode tokens (last position) and chunked-prefill chunks (several trailing positions).
    query_seq, query_pos = [], []
    for s, n in enumerate(seq_lens):
        chunk = {0: 1, 1: 9, 2: 1, 3: 20}[s]
        for pos in range(n - chunk, n):
            query_seq.append(s)
            query_pos.append(pos)
    query_seq = torch.tensor(query_seq, dtype=torch.int32)
    query_pos = torch.tensor(query_pos, dtype=torch.int32)
    num_tokens = query_seq.numel()
    q_full = torch.randn(num_tokens, num_heads, head_dim + 4, generator=gen, dtype=torch.float64).to(dtype)
    query = q_full[:, :, :head_dim]  # strided heads
    sinks = torch.randn(num_heads, generator=gen) if use_sinks else None
    scale = 1.0 / math.sqrt(head_dim)
    out_full = torch.full((num_tokens, num_heads, head_dim + 3), float("nan"), dtype=dtype)
    out = out_full[:, :, :head_dim]
    ops.paged_attention(
        query, query_seq, query_pos, block_table, torch.tensor(seq_lens, dtype=torch.int32),
        cache, scale, sliding_window=window, sinks=sinks, out=out,
    )
    expected = reference(query.double(), keys, values, query_seq, query_pos, seq_lens, scale, window, sinks)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=rtol, atol=atol)
    assert torch.isnan(out_full[:, :, head_dim:]).all()


def test_paged_attention_large_logits_are_stable():
    gen = torch.Generator().manual_seed(4)
    cache, _, _, block_table, keys, values = build_cache([40], 1, 64, torch.float32, gen)
    query = torch.randn(1, 1, 64, generator=gen) * 200.0  # logits in the thousands
    qs, qp = torch.tensor([0], dtype=torch.int32), torch.tensor([39], dtype=torch.int32)
    out = ops.paged_attention(query, qs, qp, block_table, torch.tensor([40], dtype=torch.int32), cache, 1.0)
    expected = reference(query.double(), keys, values, qs, qp, [40], 1.0, 0, None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def _args():
    gen = torch.Generator().manual_seed(1)
    cache, _, _, block_table, _, _ = build_cache([20], 2, 36, torch.float32, gen)
    return {
        "query": torch.randn(2, 4, 36), "query_seq": torch.zeros(2, dtype=torch.int32),
        "query_pos": torch.tensor([18, 19], dtype=torch.int32), "block_table": block_table,
        "seq_lens": torch.tensor([20], dtype=torch.int32), "cache": cache, "scale": 0.1,
    }


@pytest.mark.parametrize(
    "update,arg",
    [
        ({"query": torch.randn(2, 3, 36)}, "num_kv_heads"),
        ({"query": torch.randn(2, 4, 32)}, "query"),
        ({"query": torch.randn(2, 4, 36, dtype=torch.float64)}, "query"),
        ({"query_seq": torch.tensor([0, 1], dtype=torch.int32)}, "query_seq"),
        ({"query_pos": torch.zeros(3, dtype=torch.int32)}, "query_pos"),
        ({"seq_lens": torch.tensor([99], dtype=torch.int32)}, "seq_lens"),
        ({"sinks": torch.zeros(3)}, "sinks"),
        ({"sliding_window": -1}, "sliding_window"),
        ({"out": torch.empty(2, 4, 36, dtype=torch.float16)}, "out"),
    ],
)
def test_paged_attention_rejects_bad_arguments(update, arg):
    args = _args()
    args.update(update)
    with pytest.raises(moelora.InvalidArgument, match=arg):
        ops.paged_attention(**args)


def test_kv_cache_write_rejects_bad_arguments():
    cache = _args()["cache"]
    k = torch.randn(3, 2, 36)
    with pytest.raises(moelora.InvalidArgument, match="slot_mapping"):
        ops.kv_cache_write(k, k, torch.zeros(3, dtype=torch.int32), cache)
    with pytest.raises(moelora.InvalidArgument, match="slot_mapping"):
        ops.kv_cache_write(k, k, torch.tensor([0, -2, 1]), cache)
    with pytest.raises(moelora.InvalidArgument, match="value"):
        ops.kv_cache_write(k, torch.randn(3, 1, 36), torch.zeros(3, dtype=torch.int64), cache)
    with pytest.raises(moelora.InvalidArgument, match="page_bytes"):
        small = ops.make_kv_cache_view(cache._keepalive[0], page_bytes=64, block_tokens=16,
                                       num_kv_heads=2, head_dim=36, dtype=torch.float32)
        ops.kv_cache_write(k, k, torch.zeros(3, dtype=torch.int64), small)
