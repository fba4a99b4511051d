"""Load a local HF checkpoint directory: config.json + single or sharded safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from moelora.models import quantized
from moelora.models.base import CausalLM
from moelora.models.weights import WeightMapper


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


def load_weights(model: CausalLM, path: str | Path, progress: bool = True) -> None:
    """Fill every parameter of `model` from the safetensors under `path`; errors name tensors."""
    mapper = WeightMapper(model, model.checkpoint_rules(model.config))
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
        for name, tensor in quantized.checkpoint_tensors(entries, first.dtype):
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
    config = cls.config_from_hf(read_hf_config(path))
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls(config)
        finally:
            torch.set_default_dtype(prev)
    load_weights(model, path, progress=progress)
    return model.eval()
