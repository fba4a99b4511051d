"""Tensor references for the native module.

The native module links no libtorch: a torch tensor crosses the boundary as a tuple
(data_ptr, dtype code, shape, strides, device type, device index); CUDA streams as raw handles.
"""

from __future__ import annotations

import torch

# Must match moelora::DType in include/moelora/dtype.h.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.uint8: 5,
    torch.uint32: 6,
    torch.float64: 7,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"moelora does not support tensors of dtype {dtype}") from None


def as_ref(t: torch.Tensor) -> tuple:
    """The native view of `t`: no copy, strides in elements."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    device_type = 1 if t.device.type == "cuda" else 0
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"moelora supports cpu and cuda tensors, got {t.device}")
    return (
        t.data_ptr(),
        dtype_code(t.dtype),
        tuple(t.shape),
        tuple(t.stride()),
        device_type,
        t.device.index or 0,
    )


def as_optional_ref(t: torch.Tensor | None):
    return None if t is None else as_ref(t)


def stream_handle(device: torch.device) -> int:
    """The current CUDA stream of `device` as a raw handle (0 for the CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
