"""PEFT LoRA adapters: parsing, registration-time validation, load plans and dense matrices.

plan = load_adapter_plan(path, model.lora_sites(), model.peft_layout, max_lora_rank=64)
dense = load_dense(plan)  # reference path: {site: {layer: (A, B)}}
"""

from moelora.lora.config import AdapterConfig, load_adapter_config, parse_adapter_config
from moelora.lora.dense import load_dense
from moelora.lora.plan import AdapterPlan, MatrixSource, load_adapter_plan, per_expert_sources
from moelora.lora.sites import ALL_SITE_NAMES, LoraSiteSpec, PeftLayout, peft_layout_of, site_table
from moelora.lora.validate import (
    SUPPORTED_DTYPES,
    AdapterValidationError,
    TensorHeader,
    read_safetensors_header,
)

__all__ = [
    "ALL_SITE_NAMES",
    "SUPPORTED_DTYPES",
    "AdapterConfig",
    "AdapterPlan",
    "AdapterValidationError",
    "LoraSiteSpec",
    "MatrixSource",
    "PeftLayout",
    "TensorHeader",
    "load_adapter_config",
    "load_adapter_plan",
    "load_dense",
    "parse_adapter_config",
    "peft_layout_of",
    "per_expert_sources",
    "read_safetensors_header",
    "site_table",
]
