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

# The offline API is imported on first use, so `import moelora` stays light for tools that
# only need the native core.
_LAZY = {
    "LLM": "moelora.entrypoints.llm",
    "SamplingParams": "moelora.engine.sampling_params",
    "StructuredOutputsParams": "moelora.engine.structured_params",
    "GuidedDecodingParams": "moelora.engine.structured_params",
    "LoRARequest": "moelora.engine.adapters",
    "RequestOutput": "moelora.engine.request",
    "CompletionOutput": "moelora.engine.request",
    "AdapterValidationError": "moelora.lora.validate",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moelora' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


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
    "LLM",
    "AdapterError",
    "AdapterValidationError",
    "Cancelled",
    "CompletionOutput",
    "CudaError",
    "GuidedDecodingParams",
    "InternalError",
    "InvalidArgument",
    "IoError",
    "LoRARequest",
    "MoeloraError",
    "NotFound",
    "PoolExhausted",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "__version__",
    "built_with_cuda",
    "cmake_prefix_path",
    "cuda_available",
]
