"""The MXFP4 mma layout on the CPU: the library's table against the contract, the Python repack
against the C++ word permutation, and every reader (the expert GEMM's reference, dequantize)
giving the same bits for a stack in either layout, at awkward sizes and with scales past 128.
The GPU kernels over the same layout: test_gpu_moe_ops.py, test_gpu_moe_stream.py."""

from __future__ import annotations

import pytest
import torch
from moe_reference import (
    MMA_POSITIONS,
    dequantize,
    in_mma_layout,
    in_tiled_layout,
    mma_codes,
    random_weights,
)
from moelora import InvalidArgument
from moelora.ops import moe as moe_ops


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _words(t: torch.Tensor) -> list[int]:
    return [w & 0xFFFFFFFF for w in t.contiguous().view(torch.int32).flatten().tolist()]


def test_the_library_table_is_the_contract_and_a_permutation():
    assert tuple(tuple(p) for p in moe_ops._C.MXFP4_MMA_POSITIONS) == MMA_POSITIONS
    assert sorted(p for positions in MMA_POSITIONS for p in positions) == list(range(32))


def test_repack_is_the_native_word_permutation_and_inverts():
    gen = _gen(1)
    blocks = torch.randint(0, 256, (3, 5, 7, 16), dtype=torch.uint8, generator=gen)
    single_bits = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
    single_bits = (single_bits - (single_bits >= 1 << 31).long() * (1 << 32)).int()
    blocks[0, :2, :4] = single_bits.view(torch.uint8).view(2, 4, 16)  # every single-bit word
    mma = moe_ops.mxfp4_to_mma_layout(blocks)
    assert mma.shape == blocks.shape and mma.dtype == torch.uint8
    assert _words(mma) == [moe_ops._C.mxfp4_to_mma_word(w) for w in _words(blocks)]
    assert torch.equal(moe_ops.mxfp4_from_mma_layout(mma), blocks)
    codes = torch.stack((blocks.long() & 15, blocks.long() >> 4), -1).flatten(-2)
    assert torch.equal(mma_codes(mma), codes)  # the contract's decoding of the repacked bytes


def test_repack_takes_views_works_in_place_and_in_chunks(monkeypatch):
    gen = _gen(2)
    blocks = torch.randint(0, 256, (4, 6, 9, 16), dtype=torch.uint8, generator=gen)
    want = moe_ops.mxfp4_to_mma_layout(blocks)
    cut = blocks[:, 1:5, 3:7]  # a tensor-parallel cut of whole blocks: not contiguous
    assert torch.equal(moe_ops.mxfp4_to_mma_layout(cut), want[:, 1:5, 3:7])
    monkeypatch.setattr(moe_ops, "MXFP4_REPACK_CHUNK_BYTES", 1000)  # one expert at a time
    same = blocks.clone()
    assert moe_ops.mxfp4_to_mma_layout(same, out=same) is same
    assert torch.equal(same, want)
    with pytest.raises(ValueError, match=r"uint8 \[\.\.\., 16\]"):
        moe_ops.mxfp4_to_mma_layout(blocks.view(4, 6, 18, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,experts,top_k,hidden", [(1, 8, 2, 96), (7, 8, 4, 3552),
                                                          (133, 16, 3, 96)])
@pytest.mark.parametrize("activation", ["none", "gpt_oss"])
def test_gemm_over_either_layout_is_bit_identical(dtype, tokens, experts, top_k, hidden,
                                                  activation):
    gen = _gen(tokens + hidden)
    w = random_weights("mxfp4", experts, 2 * 40, hidden, dtype, gen)
    w.scales = torch.randint(110, 140, w.scales.shape, dtype=torch.uint8, generator=gen)  # > 128
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    routing = moe_ops.route(torch.randn(tokens, experts, generator=gen), top_k, "topk_softmax",
                            True, 8)
    mma = in_mma_layout(w)
    outs = [moe_ops.expert_gemm(x, routing, stack, input_pairs_per_row=top_k,
                                activation=activation) for stack in (w, mma)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(moe_ops.dequantize(mma, dtype=dtype), moe_ops.dequantize(w, dtype=dtype))
    assert torch.equal(moe_ops.dequantize(mma, 1, 2, dtype), dequantize(mma, dtype)[1:3])


@pytest.mark.parametrize("hidden", [32, 160, 864])
@pytest.mark.parametrize("activation", ["none", "gpt_oss"])
def test_gemm_over_tiles_is_bit_identical(hidden, activation):
    # 16-row tiles stored k-step-major (the engine's layout) hold the same values: one k-step
    # (32 inputs: three blocks of padding), several, and a last one three quarters padding.
    gen = _gen(hidden)
    w = random_weights("mxfp4", 6, 2 * 48, hidden, torch.bfloat16, gen)
    tiled = in_tiled_layout(w)
    assert tiled.weight.shape == (6, 6, -(-hidden // 128), 16, 64)
    assert (tiled.out_dim, tiled.in_dim) == (96, hidden)
    x = torch.randn(9, hidden, generator=gen).to(torch.bfloat16)
    routing = moe_ops.route(torch.randn(9, 6, generator=gen), 2, "softmax_topk", True, 8)
    outs = [moe_ops.expert_gemm(x, routing, stack, input_pairs_per_row=2,
                                activation=activation) for stack in (w, tiled)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(moe_ops.dequantize(tiled, 2, 3), moe_ops.dequantize(w, 2, 3))
    blocks, scales = moe_ops.mxfp4_from_tiled_layout(tiled.weight, tiled.scales, hidden)
    assert torch.equal(blocks, moe_ops.mxfp4_to_mma_layout(w.weight))
    assert torch.equal(scales, w.scales)


def test_tiling_a_few_experts_at_a_time_equals_tiling_at_once(monkeypatch):
    gen = _gen(8)
    w = in_mma_layout(random_weights("mxfp4", 5, 32, 160, torch.bfloat16, gen))
    whole = moe_ops.mxfp4_to_tiled_layout(w.weight, w.scales)
    monkeypatch.setattr(moe_ops, "MXFP4_REPACK_CHUNK_BYTES", 2 * 32 * 8 * 16)  # 2 experts
    chunked = moe_ops.mxfp4_to_tiled_layout(w.weight, w.scales)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_tiles_need_whole_tiles_and_their_own_shapes():
    gen = _gen(5)
    w = random_weights("mxfp4", 2, 40, 64, torch.bfloat16, gen)
    with pytest.raises(ValueError, match="whole tiles of 16, got 40"):
        moe_ops.mxfp4_to_tiled_layout(w.weight, w.scales)
    tiled = in_tiled_layout(random_weights("mxfp4", 2, 32, 256, torch.bfloat16, gen))
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    routing = moe_ops.route(torch.randn(3, 2, generator=gen), 1, "softmax_topk", True, 8)
    wrong_k = torch.randn(3, 384, generator=gen).to(torch.bfloat16)
    with pytest.raises(InvalidArgument, match=r"weight.*ceil\(input width / 128\) k-steps"):
        moe_ops.expert_gemm(wrong_k, routing, tiled, input_pairs_per_row=1)
    wide = torch.zeros(*tiled.weight.shape[:4], 128, dtype=torch.uint8)
    wide[..., :64] = tiled.weight
    strided = moe_ops.ExpertWeights("mxfp4", wide[..., :64], tiled.scales, layout="mma_tiled",
                                    k=256)
    with pytest.raises(InvalidArgument, match="contiguous in their last three dimensions"):
        moe_ops.expert_gemm(x, routing, strided, input_pairs_per_row=1)
    gapped = moe_ops.ExpertWeights("mxfp4", tiled.weight, tiled.scales[..., ::2, :],
                                   layout="mma_tiled", k=256)
    with pytest.raises(InvalidArgument, match="scales"):
        moe_ops.expert_gemm(x, routing, gapped, input_pairs_per_row=1)


def test_layout_errors_are_named():
    gen = _gen(3)
    x = torch.randn(4, 64, generator=gen)
    routing = moe_ops.route(torch.randn(4, 8, generator=gen), 2, "softmax_topk", True, 4)
    dense = random_weights("dense", 8, 32, 64, torch.float32, gen)
    dense.layout = "mma"
    with pytest.raises(InvalidArgument, match="an MXFP4 layout applies to MXFP4 weights only"):
        moe_ops.expert_gemm(x, routing, dense, input_pairs_per_row=2)
    mx = random_weights("mxfp4", 8, 32, 64, torch.float32, gen)
    mx.layout = "nibbles"
    with pytest.raises(ValueError, match="layout must be one of"):
        moe_ops.expert_gemm(x, routing, mx, input_pairs_per_row=2)


def test_loaded_models_hold_tiled_blocks_with_the_checkpoints_values():
    """build_synthetic (like every loader) packs MXFP4 experts once, into tiles; the forward
    pass equals the same model over the checkpoint bytes bit for bit, and packing again changes
    nothing."""
    import copy

    from moelora.models import ReferenceContext
    from moelora.models.synthetic import build_synthetic

    model = build_synthetic("tiny-gpt-oss", dtype=torch.float32, num_layers=2)
    experts = model.model.layers[0].mlp.experts
    assert experts.format == "mxfp4" and experts.mxfp4_layout == "mma_tiled"
    assert experts.w13_blocks.dim() == 5
    blocks = experts.w13_blocks.clone()
    model.pack_for_kernels()
    assert torch.equal(experts.w13_blocks, blocks)
    stored = copy.deepcopy(model)
    for layer in stored.model.layers:
        e = layer.mlp.experts
        e.unpack_tiles()
        assert e.mxfp4_layout == "mma" and e.w13_blocks.dim() == 4
        for leaf in ("w13_blocks", "w2_blocks"):
            moe_ops.mxfp4_from_mma_layout(getattr(e, leaf).data, out=getattr(e, leaf).data)
        e.mxfp4_layout = "checkpoint"
    assert all(w.layout == "checkpoint" for w in stored.model.layers[0].mlp.experts.stacks())
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    hidden = []
    for m in (model, stored):
        ctx = ReferenceContext()
        ctx.begin_step(torch.zeros_like(ids), torch.arange(7))
        hidden.append(m(ids, torch.arange(7), ctx))
    assert torch.equal(hidden[0], hidden[1])
