"""MXFP4 checkpoint tensors (OCP Microscaling, as GPT-OSS ships its experts), dequantized at load.

A quantized tensor W [..., rows, cols] is stored as two tensors:
  <name>_blocks  uint8 [..., rows, cols / 32, 16]: 32 E2M1 codes per block, two per byte, the
                 low nibble holding the even element;
  <name>_scales  uint8 [..., rows, cols / 32]: one E8M0 exponent per block (bias 127), so
                 element = E2M1 value * 2 ** (scale - 127).
GPT-OSS stores its experts this way with rows = the output dimension; its unquantized tensors
are [E, in, out], so the dequantized matrix is returned transposed to that layout and loads
through the same rules as a bf16 checkpoint. Every E2M1 value times a power of two is exact in
bfloat16, so dequantizing to bf16 loses nothing.
"""

from __future__ import annotations

import torch

BLOCKS, SCALES = "_blocks", "_scales"
# E2M1: sign, 2 exponent bits, 1 mantissa bit; codes 0-7 positive, 8-15 their negatives.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., rows, G, 16] codes and [..., rows, G] exponents -> [..., G * 32, rows] in dtype."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and "
                         f"{scales.dtype}")
    if blocks.dim() < 3 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales "
                         f"{tuple(scales.shape)} (expected [..., rows, G, 16] and [..., rows, G])")
    table = torch.tensor(_E2M1, dtype=torch.float32)
    lead = blocks.shape[:-3]
    rows, groups = blocks.shape[-3], blocks.shape[-2]
    flat_blocks = blocks.reshape(-1, rows, groups, 16)
    flat_scales = scales.reshape(-1, rows, groups)
    out = torch.empty(flat_blocks.shape[0], groups * 32, rows, dtype=dtype)
    for i in range(flat_blocks.shape[0]):  # one matrix at a time bounds the temporaries
        codes = torch.stack((flat_blocks[i] & 0x0F, flat_blocks[i] >> 4), dim=-1)  # [r, G, 16, 2]
        values = table[codes.reshape(rows, groups, 32).long()]
        values = torch.ldexp(values, (flat_scales[i].to(torch.int32) - 127)[..., None].float())
        out[i] = values.reshape(rows, groups * 32).t().to(dtype)
    return out.reshape(*lead, groups * 32, rows)


def checkpoint_tensors(entries, dtype: torch.dtype):
    """(name, tensor) for each checkpoint entry ((name, safetensors handle) pairs), with every
    <name>_blocks + <name>_scales pair replaced by the dequantized <name>."""
    handles = dict(entries)
    for name, handle in entries:
        if name.endswith(SCALES) and name[:-len(SCALES)] + BLOCKS in handles:
            continue  # consumed with its blocks
        if name.endswith(BLOCKS):
            base = name[:-len(BLOCKS)]
            scales = handles.get(base + SCALES)
            if scales is None:
                raise KeyError(f"MXFP4 tensor {name!r} has no {base + SCALES!r} beside it")
            yield base, dequantize(handle.get_tensor(name), scales.get_tensor(base + SCALES),
                                   dtype)
            continue
        yield name, handle.get_tensor(name)
