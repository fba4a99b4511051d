"""float64 torch references and random inputs for the MoE layer's ops (moelora.ops.moe).

Shared by the CPU tests (test_moe_ops.py) and the GPU tests (test_gpu_moe_*.py). The references
are written from the contract in include/moelora/moe.h, independently of the native code.
"""

from __future__ import annotations

import math

import torch
from moelora.ops import moe as moe_ops

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)
TOLERANCE = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# The MXFP4 mma layout as moelora/moe.h and src/mxfp4_layout.h define it, written out again:
# bit b (mantissa, exponent 0, exponent 1, sign) of element i of a 32-bit word sits at
# MMA_POSITIONS[i][b].
MMA_POSITIONS = ((0, 1, 2, 9), (16, 17, 18, 25), (10, 3, 4, 11), (26, 19, 20, 27),
                 (12, 13, 14, 21), (28, 29, 30, 5), (6, 7, 8, 15), (22, 23, 24, 31))


# ---- routing ---------------------------------------------------------------------------------

def route_reference(logits: torch.Tensor, top_k: int, routing: str, renormalize: bool):
    """(ids int64 [T, K], weights float64 [T, K]): largest first, equal logits to the lower id,
    NaN below every number."""
    values = logits.double().cpu()
    keys = torch.where(torch.isnan(values), torch.full_like(values, -math.inf), values)
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices
    ids = order[:, :top_k]
    top = keys.gather(1, order[:, :1])
    chosen = values.gather(1, ids)
    if routing == "topk_softmax":
        e = torch.exp(chosen - top)
        return ids, e / e.sum(1, keepdim=True)
    weights = torch.exp(chosen - top) / torch.exp(values - top).sum(1, keepdim=True)
    if renormalize:
        weights = weights / weights.sum(1, keepdim=True)
    return ids, weights


def blocks_reference(ids: torch.Tensor, num_experts: int, block_m: int, max_blocks: int):
    """(sorted_pairs, block_expert, num_blocks, expert_counts) as the CPU op lays them out:
    experts in order, each expert's pairs in increasing pair id, padded to block_m with -1."""
    flat = ids.flatten().tolist()
    pairs = [-1] * (max_blocks * block_m)
    block_expert = [-1] * max_blocks
    counts = [0] * num_experts
    blocks = 0
    for e in range(num_experts):
        mine = [p for p, x in enumerate(flat) if x == e]
        counts[e] = len(mine)
        for i, p in enumerate(mine):
            pairs[blocks * block_m + i] = p
        n = -(-len(mine) // block_m)
        block_expert[blocks:blocks + n] = [e] * n
        blocks += n
    as_int = lambda v: torch.tensor(v, dtype=torch.int32)
    return as_int(pairs), as_int(block_expert), as_int([blocks]), as_int(counts)


def manual_routing(expert_of_pair: torch.Tensor, top_k: int, num_experts: int, block_m: int,
                   weights: torch.Tensor | None = None) -> moe_ops.Routing:
    """A Routing whose pairs go to the given experts (int [T, K]), grouped as the CPU op would."""
    ids = expert_of_pair.reshape(-1, top_k).to(torch.int32)
    device = expert_of_pair.device
    max_blocks = moe_ops._C.moe_route_max_blocks(ids.numel(), num_experts, block_m)
    pairs, block_expert, num_blocks, counts = blocks_reference(ids.cpu(), num_experts, block_m,
                                                               max_blocks)
    if weights is None:
        weights = torch.full(ids.shape, 1.0 / top_k)
    return moe_ops.Routing(ids.to(device), weights.float().to(device), pairs.to(device),
                           block_expert.to(device), num_blocks.to(device), counts.to(device),
                           block_m)


# ---- expert weights ---------------------------------------------------------------------------

def random_weights(fmt: str, num_experts: int, n: int, k: int, dtype: torch.dtype,
                   gen: torch.Generator, bias: bool = True,
                   fp8_block: tuple[int, int] = (16, 32)) -> moe_ops.ExpertWeights:
    """Random weights in `fmt` whose products with N(0, 1) rows are O(1): spread ~1/sqrt(k).
    fmt "mxfp4_mma": the same MXFP4 stack repacked into the mma layout; "mxfp4_tiled": into its
    16-row tiles (n a multiple of 16)."""
    spread = 1.0 / math.sqrt(k)
    b = torch.randn(num_experts, n, generator=gen).to(dtype) if bias else None
    if fmt == "dense":
        w = (torch.randn(num_experts, n, k, generator=gen) * spread).to(dtype)
        return moe_ops.ExpertWeights("dense", w, bias=b)
    if fmt in ("mxfp4", "mxfp4_mma", "mxfp4_tiled"):
        blocks = torch.randint(0, 256, (num_experts, n, k // 32, 16), generator=gen,
                               dtype=torch.uint8)
        center = 127 + round(math.log2(spread / 2.93))  # random codes: RMS 2.93
        scales = torch.randint(center - 2, center + 3, (num_experts, n, k // 32), generator=gen,
                               dtype=torch.uint8)
        w = moe_ops.ExpertWeights("mxfp4", blocks, scales, b)
        if fmt == "mxfp4_tiled":
            return in_tiled_layout(w)
        return in_mma_layout(w) if fmt == "mxfp4_mma" else w
    bn, bk = fp8_block
    w = torch.randn(num_experts, n, k, generator=gen).to(torch.float8_e4m3fn)
    scales = spread * (0.5 + torch.rand(num_experts, -(-n // bn), -(-k // bk), generator=gen))
    return moe_ops.ExpertWeights("fp8", w, scales.float(), b, bn, bk)


def dequantize(w: moe_ops.ExpertWeights, dtype: torch.dtype) -> torch.Tensor:
    """[E, N, K] as the kernels see the weights: dequantized, rounded to the activations' dtype
    (on the weights' device)."""
    if w.format == "dense":
        return w.weight.to(dtype)
    if w.format == "mxfp4" and w.layout == "mma_tiled":
        blocks, scales = moe_ops.mxfp4_from_tiled_layout(w.weight, w.scales, w.k)
        return dequantize(moe_ops.ExpertWeights("mxfp4", blocks, scales, layout="mma"), dtype)
    if w.format == "mxfp4":
        blocks = w.weight.long()
        if w.layout == "mma":
            codes = mma_codes(blocks).flatten(-2)  # [E, N, K]
        else:
            codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-3)  # [E, N, K]
        exponent = (w.scales.double() - 127).repeat_interleave(32, dim=-1)
        return (E2M1.to(blocks.device)[codes] * torch.exp2(exponent)).to(dtype)
    bn, bk = w.block_n, w.block_k
    _, n, k = w.weight.shape
    scale = w.scales.double().repeat_interleave(bn, 1)[:, :n].repeat_interleave(bk, 2)
    return (w.weight.double() * scale[:, :, :k]).float().to(dtype)


def mma_codes(blocks: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] blocks in the mma layout (any integer dtype) -> [..., G, 32] codes, one bit
    at a time from MMA_POSITIONS."""
    b = blocks.long()
    words = b[..., 0::4] | b[..., 1::4] << 8 | b[..., 2::4] << 16 | b[..., 3::4] << 24  # [.., 4]
    codes = torch.zeros(*words.shape, 8, dtype=torch.long, device=blocks.device)
    for i, positions in enumerate(MMA_POSITIONS):
        for bit, position in enumerate(positions):
            codes[..., i] |= ((words >> position) & 1) << bit
    return codes.flatten(-2)  # element 8u + i of the block


def activation_reference(h13: torch.Tensor, kind: str, alpha: float = 1.702,
                         limit: float = 7.0) -> torch.Tensor:
    inter = h13.shape[1] // 2
    gate, up = h13[:, :inter].double(), h13[:, inter:].double()
    if kind == "silu":
        return gate * torch.sigmoid(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def gemm_reference(input: torch.Tensor, input_pairs_per_row: int, expert_of_pair: torch.Tensor,
                   w: moe_ops.ExpertWeights, activation: str = "none",
                   topk_weights: torch.Tensor | None = None, alpha: float = 1.702,
                   limit: float = 7.0) -> torch.Tensor:
    """float64 [P, N or N/2] on the input's device: row p = epilogue(input[p // ipr] @
    W[e(p)]^T + bias[e(p)]), one expert at a time (real shapes fit in memory)."""
    device = input.device
    flat = expert_of_pair.flatten().long().to(device)
    rows = input.double()[torch.arange(flat.numel(), device=device) // input_pairs_per_row]
    acc = torch.empty(flat.numel(), w.out_dim, dtype=torch.float64, device=device)
    for e in torch.unique(flat).tolist():
        mine = (flat == e).nonzero().flatten()
        weight = dequantize(_expert(w, e), input.dtype).double().to(device)[0]
        acc[mine] = rows[mine] @ weight.T
    if w.bias is not None:
        acc = acc + w.bias.double().to(device)[flat]
    out = acc if activation == "none" else activation_reference(acc, activation, alpha, limit)
    if topk_weights is not None:
        out = out * topk_weights.double().to(device).flatten()[:, None]
    return out


def _expert(w: moe_ops.ExpertWeights, e: int) -> moe_ops.ExpertWeights:
    """Expert e of a stack, as a stack of one."""
    pick = lambda t: None if t is None else t[e:e + 1]
    return moe_ops.ExpertWeights(w.format, pick(w.weight), pick(w.scales), None, w.block_n,
                                 w.block_k, w.layout, w.k)


def in_tiled_layout(w: moe_ops.ExpertWeights) -> moe_ops.ExpertWeights:
    """An MXFP4 stack (checkpoint layout) as the engine's 16-row tiles (same values)."""
    tiles, scales = moe_ops.mxfp4_to_tiled_layout(moe_ops.mxfp4_to_mma_layout(w.weight),
                                                  w.scales)
    return moe_ops.ExpertWeights("mxfp4", tiles, scales, w.bias, layout="mma_tiled",
                                 k=w.in_dim)


def in_mma_layout(w: moe_ops.ExpertWeights) -> moe_ops.ExpertWeights:
    """An MXFP4 stack repacked into the mma layout (same values)."""
    return moe_ops.ExpertWeights("mxfp4", moe_ops.mxfp4_to_mma_layout(w.weight), w.scales,
                                 w.bias, layout="mma")


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """got (output dtype) against a float64 reference, with the dtype's tolerance."""
    tol = TOLERANCE[got.dtype]
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want.double().to(got.device), rtol=tol,
                               atol=tol * scale, msg=lambda m: f"{what}: {m}")
