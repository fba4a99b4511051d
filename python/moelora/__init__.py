"""moelora: one Mixture-of-Experts base model, many LoRA adapters, one GPU."""

from __future__ import annotations

from moelora import _C
from moelora._C import (
    AdapterError,
    Cancelled,
    CudaError,
    InternalError,
    InvalidArgument,
    IoError,
    MoeloraError,
    NotFound,
    PoolExhausted,
)

__version__ = _C.version()


def cuda_available() -> bool:
    """True when this build has the CUDA backend and a GPU is present."""
    return _C.cuda_available()


def built_with_cuda() -> bool:
    return _C.built_with_cuda()


def cmake_prefix_path() -> str:
    """Where find_package(moelora CONFIG) finds the installed library, headers and config."""
    import os

    return os.path.dirname(os.path.abspath(__file__))


__all__ = [
    "AdapterError",
    "Cancelled",
    "CudaError",
    "InternalError",
    "InvalidArgument",
    "IoError",
    "MoeloraError",
    "NotFound",
    "PoolExhausted",
    "__version__",
    "built_with_cuda",
    "cmake_prefix_path",
    "cuda_available",
]
