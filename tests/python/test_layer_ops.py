"""rms_norm, add_rms_norm, rope_qk and rope_kv_write on the CPU against float64 references, at
awkward sizes (1, 7, 133 tokens; hidden 111), strided rows, poisoned outputs, slot -1 rows, and
the argument errors."""

from __future__ import annotations

import moelora
import pytest
import torch
from layer_reference import (
    TOLERANCE,
    expected_arena,
    inv_freq_of,
    make_cache,
    qkv_views,
    rms_norm_ref,
    rope_ref,
    rows,
)
from moelora.ops import layer as layer_ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(got, ref64, dtype):
    rtol, atol = TOLERANCE[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), ref64, rtol=rtol, atol=atol * ref64.abs().max())


# ---- RMSNorm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 111), (7, 2880), (133, 111), (7, 64), (1, 4096)])
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_rms_norm_matches_float64(dtype, tokens, hidden, weight_fp32):
    gen = torch.Generator().manual_seed(tokens * hidden)
    x = rows(tokens, hidden, dtype, gen, pad=6)  # strided rows
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(
        torch.float32 if weight_fp32 else dtype)
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype)
    got = layer_ops.rms_norm(x, weight, 1e-5, out=out)
    assert got is out and torch.isfinite(out).all()
    assert_close(out, rms_norm_ref(x.double(), weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 111), (7, 2880), (133, 111), (133, 2048)])
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_add_rms_norm_updates_the_residual_and_normalises_the_sum(dtype, tokens, hidden,
                                                                 weight_fp32):
    gen = torch.Generator().manual_seed(tokens + hidden)
    x = rows(tokens, hidden, dtype, gen, pad=10)
    residual = rows(tokens, hidden, dtype, gen)
    before = residual.clone()
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(
        torch.float32 if weight_fp32 else dtype)
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype)
    layer_ops.add_rms_norm(x, residual, weight, 1e-6, out=out)
    # the residual holds the sum rounded to its dtype, exactly as torch adds
    assert torch.equal(residual, before + x)
    assert torch.isfinite(out).all()
    assert_close(out, rms_norm_ref(residual.double(), weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rounds_as_the_hf_modules_do(dtype):
    """A weight of the activation dtype multiplies the rounded norm (Llama); a float32 weight
    multiplies before the rounding (GPT-OSS). Both within one rounding of the torch formulas."""
    gen = torch.Generator().manual_seed(5)
    x = rows(7, 2880, dtype, gen)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    w16 = (1 + 0.1 * torch.randn(2880, generator=gen)).to(dtype)
    w32 = w16.float() + 1e-3
    llama = w16 * h.to(dtype)
    gpt_oss = (w32 * h).to(dtype)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(layer_ops.rms_norm(x, w16, 1e-5), llama, rtol=ulp, atol=1e-6)
    torch.testing.assert_close(layer_ops.rms_norm(x, w32, 1e-5), gpt_oss, rtol=ulp, atol=1e-6)


def test_rms_norm_in_place_on_its_input():
    gen = torch.Generator().manual_seed(2)
    x = rows(133, 111, torch.bfloat16, gen)
    weight = torch.randn(111, generator=gen).to(torch.bfloat16)
    ref = rms_norm_ref(x.double(), weight, 1e-6)
    assert layer_ops.rms_norm(x, weight, 1e-6, out=x) is x
    assert_close(x, ref, torch.bfloat16)
    residual = rows(7, 111, torch.float32, gen)
    y = rows(7, 111, torch.float32, gen)
    expect = rms_norm_ref((residual + y).double(), weight.float(), 1e-6)
    layer_ops.add_rms_norm(y, residual, weight.float(), 1e-6, out=y)
    assert_close(y, expect, torch.float32)


def test_rms_norm_rejects_bad_arguments_by_name():
    x = torch.randn(4, 16)
    w = torch.ones(16)
    with pytest.raises(moelora.InvalidArgument, match="rms_norm: weight .*float32 or"):
        layer_ops.rms_norm(x, w.to(torch.float16), 1e-6)
    with pytest.raises(moelora.InvalidArgument, match="weight dimension 0 must be 16"):
        layer_ops.rms_norm(x, torch.ones(15), 1e-6)
    with pytest.raises(moelora.InvalidArgument, match="eps must be finite"):
        layer_ops.rms_norm(x, w, -1.0)
    with pytest.raises(moelora.InvalidArgument, match="out must be float32"):
        layer_ops.rms_norm(x, w, 1e-6, out=torch.empty(4, 16, dtype=torch.bfloat16))
    with pytest.raises(moelora.InvalidArgument, match="input must be contiguous in its last"):
        layer_ops.rms_norm(torch.randn(16, 4).t(), w, 1e-6)
    with pytest.raises(moelora.InvalidArgument, match="residual is updated in place"):
        layer_ops.add_rms_norm(x, x, w, 1e-6)
    residual = torch.randn(4, 16)
    with pytest.raises(moelora.InvalidArgument, match="residual dimension 0 must be 4"):
        layer_ops.add_rms_norm(x, torch.randn(3, 16), w, 1e-6)
    before = residual.clone()
    with pytest.raises(moelora.InvalidArgument):
        layer_ops.add_rms_norm(x, residual, torch.ones(3), 1e-6)
    assert torch.equal(residual, before)  # a rejected call changes nothing


def test_rms_norm_of_no_tokens_is_a_no_op():
    out = layer_ops.add_rms_norm(torch.empty(0, 8), torch.empty(0, 8), torch.ones(8), 1e-6)
    assert out.shape == (0, 8)


# ---- rope + KV write ---------------------------------------------------------------------------

ROPE_CASES = [  # tokens, Hq, Hkv, head_dim, rope type
    (1, 64, 8, 64, "yarn"),  # gpt-oss-20b
    (7, 32, 4, 128, "default"),  # qwen3-30b-a3b
    (133, 4, 2, 48, "llama3"),  # D/2 = 24: lanes without a pair
    (7, 3, 3, 256, "default"),  # the widest head
    (7, 2, 1, 2, "default"),
]


def _positions(tokens, gen):
    """Small positions and large ones (long contexts: the angle's range reduction)."""
    small = torch.randint(0, 64, (tokens,), generator=gen)
    large = torch.randint(0, 131072, (tokens,), generator=gen)
    return torch.where(torch.arange(tokens) % 2 == 0, small, large).to(torch.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hkv,dim,rope_type", ROPE_CASES)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_qk_matches_float64(dtype, tokens, hq, hkv, dim, rope_type, qk_norm):
    gen = torch.Generator().manual_seed(tokens * dim + hq)
    q, k, v = qkv_views(tokens, hq, hkv, dim, dtype, gen)
    v_before = v.clone()
    positions = _positions(tokens, gen)
    inv_freq, scaling = inv_freq_of(rope_type, dim)
    q_norm = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype) if qk_norm else None
    k_norm = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype) if qk_norm else None
    q_ref = rope_ref(q, positions, inv_freq, scaling, q_norm, 1e-6)
    k_ref = rope_ref(k, positions, inv_freq, scaling, k_norm, 1e-6)
    layer_ops.rope_qk(q, k, positions, inv_freq, scaling, q_norm, k_norm, 1e-6)
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)
    assert torch.equal(v, v_before)  # the value part of the fused row is not touched


def test_rope_qk_float32_equals_the_torch_formula_bit_for_bit():
    """float32 without norms: HF's x * cos + rotate_half(x) * sin with the same float32 cos/sin
    (up to the last bit of the cos/sin themselves, which come from different libms)."""
    gen = torch.Generator().manual_seed(9)
    q, k, _ = qkv_views(7, 8, 2, 64, torch.float32, gen)
    positions = torch.arange(100, 107)
    inv_freq, scaling = inv_freq_of("default", 64)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * scaling)[:, None], (emb.sin() * scaling)[:, None]

    def hf(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    expect_q, expect_k = hf(q.clone()), hf(k.clone())
    layer_ops.rope_qk(q, k, positions, inv_freq, scaling)
    torch.testing.assert_close(q, expect_q, rtol=3e-7, atol=3e-7)
    torch.testing.assert_close(k, expect_k, rtol=3e-7, atol=3e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hkv,dim,rope_type", ROPE_CASES)
def test_rope_kv_write_rotates_and_writes_every_slot_once(dtype, tokens, hq, hkv, dim,
                                                          rope_type):
    gen = torch.Generator().manual_seed(tokens + dim)
    q, k, v = qkv_views(tokens, hq, hkv, dim, dtype, gen)
    num_pages = tokens // 16 + 6
    cache, arena, page_bytes = make_cache(num_pages, hkv, dim, dtype)
    slots = torch.randperm(num_pages * 16, generator=gen)[:tokens].to(torch.int64)
    slots[::3] = -1  # skipped tokens (graph padding rows)
    positions = _positions(tokens, gen)
    inv_freq, scaling = inv_freq_of(rope_type, dim)
    q_ref = rope_ref(q, positions, inv_freq, scaling)
    k_ref = rope_ref(k, positions, inv_freq, scaling)
    v_in = v.clone()
    layer_ops.rope_kv_write(q, k, v, positions, inv_freq, slots, cache, scaling)
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)
    assert torch.equal(v, v_in)
    # the pages hold exactly the rotated keys and the values; every other byte is untouched
    assert torch.equal(arena, expected_arena(torch.full_like(arena, 0xFF), page_bytes, slots,
                                             k, v))


def test_rope_kv_write_fuses_the_qwen3_head_norm():
    gen = torch.Generator().manual_seed(4)
    q, k, v = qkv_views(7, 8, 2, 128, torch.bfloat16, gen)
    q_norm = torch.randn(128, generator=gen).to(torch.bfloat16)
    k_norm = torch.randn(128, generator=gen).to(torch.bfloat16)
    cache, arena, page_bytes = make_cache(2, 2, 128, torch.bfloat16)
    slots = torch.arange(7, dtype=torch.int64) + 16
    positions = torch.arange(7, dtype=torch.int64) + 40
    inv_freq, _ = inv_freq_of("default", 128)
    q_ref = rope_ref(q, positions, inv_freq, 1.0, q_norm, 1e-6)
    k_ref = rope_ref(k, positions, inv_freq, 1.0, k_norm, 1e-6)
    layer_ops.rope_kv_write(q, k, v, positions, inv_freq, slots, cache, 1.0, q_norm, k_norm, 1e-6)
    assert_close(q, q_ref, torch.bfloat16)
    assert_close(k, k_ref, torch.bfloat16)
    assert torch.equal(arena, expected_arena(torch.full_like(arena, 0xFF), page_bytes, slots,
                                             k, v))


def test_rope_rejects_bad_arguments_by_name_and_writes_nothing():
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv_views(3, 4, 2, 16, torch.float32, gen)
    inv_freq, _ = inv_freq_of("default", 16)
    pos = torch.arange(3)
    cache, arena, _ = make_cache(2, 2, 16, torch.float32)
    slots = torch.tensor([0, -2, 5])
    q_before, arena_before = q.clone(), arena.clone()
    with pytest.raises(moelora.InvalidArgument, match=r"slot_mapping\[1\] = -2"):
        layer_ops.rope_kv_write(q, k, v, pos, inv_freq, slots, cache)
    assert torch.equal(q, q_before) and torch.equal(arena, arena_before)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(moelora.InvalidArgument, match="head_dim must be even"):
        bad = torch.randn(3, 4, 15)
        layer_ops.rope_qk(bad, bad[:, :2], pos, torch.ones(7))
    too_wide = torch.randn(1, 1, 258)
    with pytest.raises(moelora.InvalidArgument, match="head_dim must be even and in"):
        layer_ops.rope_qk(too_wide, too_wide, pos[:1], torch.ones(129))
    with pytest.raises(moelora.InvalidArgument, match="inv_freq dimension 0 must be 8"):
        layer_ops.rope_qk(q, k, pos, torch.ones(16))
    with pytest.raises(moelora.InvalidArgument, match="positions must be int64"):
        layer_ops.rope_qk(q, k, pos.to(torch.int32), inv_freq)
    with pytest.raises(moelora.InvalidArgument, match="q_norm and k_norm must be given together"):
        layer_ops.rope_qk(q, k, pos, inv_freq, 1.0, torch.ones(16), None, 1e-6)
    with pytest.raises(moelora.InvalidArgument, match="q_norm must be float32"):
        layer_ops.rope_qk(q, k, pos, inv_freq, 1.0, torch.ones(16, dtype=torch.bfloat16),
                          torch.ones(16), 1e-6)
    with pytest.raises(moelora.InvalidArgument, match="key dimension 0 must be 3"):
        layer_ops.rope_qk(q, k[:2], pos, inv_freq)
    wrong_heads, _, _ = make_cache(2, 4, 16, torch.float32)
    with pytest.raises(moelora.InvalidArgument, match="cache holds float32 with 4 KV heads"):
        layer_ops.rope_kv_write(q, k, v, pos, inv_freq, slots, wrong_heads)
    with pytest.raises(moelora.InvalidArgument, match="value dimension 1 must be 2"):
        layer_ops.rope_kv_write(q, k, q[:, :3], pos, inv_freq, slots, cache)
    assert torch.equal(q, q_before) and torch.equal(arena, arena_before)
