"""Quantized checkpoint tensors: kept as stored for the MoE kernels, or dequantized at load.

Two formats, each a pair of tensors standing for one weight:

MXFP4 (OCP Microscaling; GPT-OSS ships its experts so): W [..., rows, cols] is
  <name>_blocks  uint8 [..., rows, cols / 32, 16]: 32 E2M1 codes per block, two per byte, the
                 low nibble holding the even element;
  <name>_scales  uint8 [..., rows, cols / 32]: one E8M0 exponent per block (bias 127), so
                 element = E2M1 value * 2 ** (scale - 127).
  GPT-OSS stores its experts with rows = the output dimension, which is the layout the MoE
  kernels read (moelora.ops.moe), so expert stacks load as stored (no dequantization; the
  gate/up rows are de-interleaved by a row permutation, see models/gpt_oss.py). Dequantized
  (the expert-parallel loader, tensors outside the experts), the matrix is returned transposed
  to GPT-OSS's unquantized [E, in, out] layout and loads through the same rules as a bf16
  checkpoint. E2M1 values times powers of two are exact in bfloat16: nothing is lost.

Block FP8 (quant_method "fp8" with weight_block_size, e.g. Qwen3-*-FP8): W [rows, cols] is
  <name>.weight            float8_e4m3fn [rows, cols]
  <name>.weight_scale_inv  float32 [ceil(rows / br), ceil(cols / bc)]: one scale per block,
                           element = fp8 value * scale (block size [br, bc], usually 128).
  Per-expert weights load as stored when the model keeps its experts in FP8 (models/loader.py
  decides); every other FP8 weight is dequantized here.
Tensor- or channel-scaled FP8 (compressed-tensors / llm-compressor, e.g. *-FP8 Mixtral):
  <name>.weight            float8_e4m3fn [rows, cols]
  <name>.weight_scale      float32 [] / [1] (per tensor) or [rows, 1] (per output channel);
  <name>.input_scale       static activation scale: not needed once weights are dequantized.
  The MoE kernels do not read this format: it is always dequantized at load.
"""

from __future__ import annotations

import math

import torch

BLOCKS, SCALES = "_blocks", "_scales"
FP8_SCALE = "_scale_inv"  # <name>.weight + <name>.weight_scale_inv
FP8_TENSOR_SCALE = "_scale"  # <name>.weight + <name>.weight_scale
INPUT_SCALE = ".input_scale"
# E2M1: sign, 2 exponent bits, 1 mantissa bit; codes 0-7 positive, 8-15 their negatives.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
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


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """float8 [rows, cols] with float32 per-block scales [ceil(rows/br), ceil(cols/bc)] ->
    [rows, cols] in dtype (the block size follows from the two shapes)."""
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"block-FP8 weight {tuple(weight.shape)} and scales "
                         f"{tuple(scale_inv.shape)} must both be 2-D")
    rows, cols = weight.shape
    block_rows = math.ceil(rows / scale_inv.shape[0])
    block_cols = math.ceil(cols / scale_inv.shape[1])
    if (math.ceil(rows / block_rows), math.ceil(cols / block_cols)) != tuple(scale_inv.shape):
        raise ValueError(f"block-FP8 scales {tuple(scale_inv.shape)} do not tile the weight "
                         f"{tuple(weight.shape)}")
    scale = scale_inv.float().repeat_interleave(block_rows, 0)[:rows]
    scale = scale.repeat_interleave(block_cols, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def dequantize_fp8_scaled(weight: torch.Tensor, scale: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """float8 [rows, cols] times a per-tensor ([] or [1]) or per-row ([rows, 1]) scale."""
    scale = scale.float()
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif tuple(scale.shape) not in ((weight.shape[0], 1), (weight.shape[0],)):
        raise ValueError(f"FP8 weight_scale {tuple(scale.shape)} is neither per tensor nor per "
                         f"output channel of the weight {tuple(weight.shape)}")
    else:
        scale = scale.reshape(-1, 1)
    return (weight.float() * scale).to(dtype)


def checkpoint_tensors(entries, dtype: torch.dtype, keep=None):
    """(name, tensor) for each checkpoint entry ((name, safetensors handle) pairs), with every
    quantized pair replaced by its dequantized weight under the unquantized name, except those
    whose weight name `keep(name)` accepts (MXFP4: the name without _blocks; FP8: the .weight
    name): they pass through as stored, each tensor under its own name."""
    handles = dict(entries)
    keep = keep or (lambda name: False)
    for name, handle in entries:
        if name.endswith(SCALES) and name[:-len(SCALES)] + BLOCKS in handles:
            continue  # consumed with its blocks
        if name.endswith(FP8_SCALE) and name[:-len(FP8_SCALE)] in handles:
            continue  # consumed with its weight
        if name.endswith(FP8_TENSOR_SCALE) and name[:-len(FP8_TENSOR_SCALE)] in handles:
            continue  # consumed with its weight
        if name.endswith(INPUT_SCALE):
            continue  # activation scales of FP8 matmuls: the weights load dequantized
        if name.endswith(BLOCKS):
            base = name[:-len(BLOCKS)]
            scales = handles.get(base + SCALES)
            if scales is None:
                raise KeyError(f"MXFP4 tensor {name!r} has no {base + SCALES!r} beside it")
            if keep(base):
                yield name, handle.get_tensor(name)
                yield base + SCALES, scales.get_tensor(base + SCALES)
                continue
            yield base, dequantize_mxfp4(handle.get_tensor(name),
                                         scales.get_tensor(base + SCALES), dtype)
            continue
        scale = handles.get(name + FP8_SCALE)
        if scale is not None and keep(name):
            yield name, handle.get_tensor(name)
            yield name + FP8_SCALE, scale.get_tensor(name + FP8_SCALE)
            continue
        if scale is not None:
            yield name, dequantize_fp8_blocks(handle.get_tensor(name),
                                              scale.get_tensor(name + FP8_SCALE), dtype)
            continue
        scale = handles.get(name + FP8_TENSOR_SCALE)
        if scale is not None:
            yield name, dequantize_fp8_scaled(handle.get_tensor(name),
                                              scale.get_tensor(name + FP8_TENSOR_SCALE), dtype)
            continue
        tensor = handle.get_tensor(name)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"checkpoint tensor {name!r} is {tensor.dtype} without a "
                             f"{name + FP8_SCALE!r} or {name + FP8_TENSOR_SCALE!r} beside it")
        yield name, tensor
