"""Model architectures and loading.

`load_model("path/to/hf_dir" | "synthetic:<preset>", dtype, device)` returns a CausalLM whose
forward takes a ForwardContext (see context.py). Architectures are looked up by config.json's
"architectures" entry in REGISTRY.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelora.models.base import CausalLM, LoraSiteSpec
from moelora.models.config import ModelConfig
from moelora.models.context import ForwardContext, ReferenceContext
from moelora.models.dense import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from moelora.models.gpt_oss import GptOssForCausalLM
from moelora.models.mixtral import MixtralForCausalLM
from moelora.models.olmoe import OlmoeForCausalLM
from moelora.models.qwen2_moe import Qwen2MoeForCausalLM
from moelora.models.qwen3_moe import Qwen3MoeForCausalLM

_FAMILIES: tuple[type[CausalLM], ...] = (
    MixtralForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen3MoeForCausalLM,
    OlmoeForCausalLM,
    GptOssForCausalLM,
    LlamaForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

REGISTRY: dict[str, type[CausalLM]] = {
    arch: cls for cls in _FAMILIES for arch in cls.architectures
}
FAMILY_CLASSES: dict[str, type[CausalLM]] = {cls.family: cls for cls in _FAMILIES}


def model_class(architecture: str) -> type[CausalLM]:
    if architecture not in REGISTRY:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{sorted(REGISTRY)}")
    return REGISTRY[architecture]


def load_model(path_or_spec: str | Path, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu", progress: bool = True,
               **synthetic_overrides) -> CausalLM:
    """A local HF directory, or `synthetic:<preset>` (random weights; accepts num_layers=...)."""
    spec = str(path_or_spec)
    if spec.startswith("synthetic:"):
        from moelora.models.synthetic import build_synthetic

        return build_synthetic(spec.removeprefix("synthetic:"), dtype=dtype, device=device,
                               **synthetic_overrides)
    if synthetic_overrides:
        raise TypeError(f"overrides {sorted(synthetic_overrides)} apply to synthetic models only")
    from moelora.models.loader import load_hf_model

    return load_hf_model(spec, REGISTRY, dtype=dtype, device=device, progress=progress)


__all__ = [
    "FAMILY_CLASSES",
    "REGISTRY",
    "CausalLM",
    "ForwardContext",
    "LoraSiteSpec",
    "ModelConfig",
    "ReferenceContext",
    "load_model",
    "model_class",
]
