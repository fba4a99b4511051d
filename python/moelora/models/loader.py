"""Load a local HF checkpoint directory: config.json + single or sharded safetensors.

Quantized expert stacks stay as stored where the MoE kernels read their format (GPT-OSS MXFP4,
block FP8 per-expert weights): `stored_expert_format` sets ModelConfig.expert_format from the
checkpoint's quantization_config, and only those tensors skip dequantization.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from moelora.models import quantized
from moelora.models.base import CausalLM
from moelora.models.config import ModelConfig
from moelora.models.weights import WeightMapper, fp8_scale_rules


def read_hf_config(path: str | Path) -> dict:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a HF model directory)")
    with open(config_path) as f:
        hf = json.load(f)
    # Multimodal wrappers keep the language model's config under text_config.
    if "text_config" in hf and "num_hidden_layers" not in hf:
        hf = {**hf["text_config"], "architectures": hf.get("architectures")}
    return hf


def safetensors_files(path: str | Path) -> list[Path]:
    """The shard list from model.safetensors.index.json, else model.safetensors, else *.st."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index} names shard {file.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no safetensors weights (model.safetensors or an index)")
    return files


def stored_expert_format(cls: type[CausalLM], config: ModelConfig, hf: dict) -> ModelConfig:
    """`config` with expert_format set to how the checkpoint's experts are stored, when the MoE
    kernels take that format as is: GPT-OSS MXFP4; block FP8 whose row blocks tile the
    expert width (gate and up rows then stack into one scale grid). Otherwise unchanged
    (dense: quantized experts are dequantized at load)."""
    quant = hf.get("quantization_config") or {}
    method = quant.get("quant_method")
    if not config.is_moe:
        return config
    if method == "mxfp4" and cls.family == "gpt_oss":
        return dataclasses.replace(config, expert_format="mxfp4")
    block = quant.get("weight_block_size")
    if method == "fp8" and block and len(block) == 2 and cls.family != "gpt_oss":
        block_n, block_k = (int(b) for b in block)
        if block_n > 0 and block_k > 0 and config.moe_intermediate_size % block_n == 0:
            return dataclasses.replace(config, expert_format="fp8",
                                       expert_fp8_block=(block_n, block_k))
    return config


def _kept_as_stored(config: ModelConfig):
    """The checkpoint weight names that load without dequantization (see checkpoint_tensors)."""
    if config.expert_format == "dense":
        return None
    return lambda name: ".experts." in name


def load_weights(model: CausalLM, path: str | Path, progress: bool = True) -> None:
    """Fill every parameter of `model` from the safetensors under `path`; errors name tensors."""
    rules = model.checkpoint_rules(model.config)
    if model.config.expert_format == "fp8":
        rules = rules + fp8_scale_rules(rules)
    mapper = WeightMapper(model, rules)
    files = safetensors_files(path)
    first = next(model.parameters())
    entries = []  # (checkpoint name, safetensors handle) over every file
    for f in files:
        handle = safe_open(str(f), framework="pt", device="cpu")
        entries.extend((name, handle) for name in handle.keys())  # noqa: SIM118
    names = {name for name, _ in entries}
    tied = model.config.tie_word_embeddings
    with tqdm(total=len(entries), desc=f"loading {Path(path).name}", unit="tensor",
              disable=not progress) as bar:
        for name, tensor in quantized.checkpoint_tensors(entries, first.dtype,
                                                         _kept_as_stored(model.config)):
            bar.update(2 if name + quantized.BLOCKS in names else 1)  # blocks + scales: two
            if tied and name == "lm_head.weight":
                continue  # tied: the embedding is the head
            mapper.load(name, tensor.to(first.device))
    missing = mapper.missing()
    if missing:
        raise KeyError(f"{path}: checkpoint lacks tensors the model needs: "
                       + ", ".join(missing[:12]))


def model_class_for(path: str | Path, registry: dict[str, type[CausalLM]] | None = None):
    """The CausalLM class of the checkpoint at `path` (from config.json's architectures)."""
    if registry is None:
        from moelora.models import REGISTRY as registry
    hf = read_hf_config(path)
    archs = hf.get("architectures") or []
    cls = next((registry[a] for a in archs if a in registry), None)
    if cls is None:
        raise ValueError(f"{path}: unsupported architecture {archs or hf.get('model_type')!r}; "
                         f"supported: {sorted(registry)}")
    return cls


def load_hf_model(path: str | Path, registry: dict[str, type[CausalLM]], dtype: torch.dtype,
                  device: torch.device | str, progress: bool = True) -> CausalLM:
    cls = model_class_for(path, registry)
    hf = read_hf_config(path)
    config = stored_expert_format(cls, cls.config_from_hf(hf), hf)
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls(config)
        finally:
            torch.set_default_dtype(prev)
    load_weights(model, path, progress=progress)
    return model.pack_for_kernels().eval()
