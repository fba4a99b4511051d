"""Each rank builds only its own shard of a Hugging Face checkpoint, one layer at a time.

The model skeleton is built without storage (the meta device). The replicated weights
(embeddings, final norm, head) and then each decoder layer in turn get host storage, are filled
from the safetensors (only that layer's tensors are read), are cut to this rank's shard
(shard.py) and moved to the device. Host memory peaks at one whole layer plus the replicated
weights and device memory at the shard, so a model larger than one GPU, or than the host's
memory divided by the ranks, still loads.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from moelora.distributed.config import ParallelConfig
from moelora.distributed.shard import finish_shard, shard_layer
from moelora.models import quantized
from moelora.models.loader import model_class_for, read_hf_config, safetensors_files
from moelora.models.rope import RotaryEmbedding
from moelora.models.weights import WeightMapper

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _give_storage(root: nn.Module, names: list[str], device) -> None:
    """Replaces the (meta) parameters `names` of `root` by uninitialised ones on `device`."""
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        old = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device),
                                          requires_grad=False))


def _fill(model, rules, names: list[str], entries, skip: set[str], path, dtype) -> None:
    """Loads `entries` ((checkpoint name, safetensors handle) pairs; MXFP4 pairs dequantized)
    into `model`; every parameter in `names` must end up filled."""
    mapper = WeightMapper(model, rules)
    for ckpt_name, tensor in quantized.checkpoint_tensors(entries, dtype):
        if ckpt_name not in skip:
            mapper.load(ckpt_name, tensor)
    missing = mapper.missing(names)
    if missing:
        raise KeyError(f"{path}: checkpoint lacks tensors the model needs: "
                       + ", ".join(missing[:12]))


def load_shard(path: str | Path, parallel: ParallelConfig, rank: int, dtype: torch.dtype,
               device: torch.device, progress: bool = False):
    """This rank's shard of the checkpoint at `path`, on `device`; returns (model, full sites)."""
    cls = model_class_for(path)
    config = cls.config_from_hf(read_hf_config(path))
    parallel.validate_model(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.rotary = RotaryEmbedding(config)  # meta buffers hold no values: compute them for real
    full_sites = model.lora_sites()
    rules = model.checkpoint_rules(config)
    skip = {"lm_head.weight"} if config.tie_word_embeddings else set()

    groups: dict[int | None, list] = defaultdict(list)  # layer (None: replicated) -> tensors
    for file in safetensors_files(path):
        handle = safe_open(str(file), framework="pt", device="cpu")
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            match = _LAYER.match(name)
            groups[int(match.group(1)) if match else None].append((name, handle))
    extra = sorted(k for k in groups if k is not None and k >= config.num_layers)
    if extra:
        raise KeyError(f"{path}: the checkpoint has layer {extra[0]} but the config has "
                       f"{config.num_layers} layers")

    params = [name for name, _ in model.named_parameters()]
    replicated = [n for n in params if not n.startswith("model.layers.")]
    _give_storage(model, replicated, "cpu")
    _fill(model, rules, replicated, groups.get(None, []), skip, path, dtype)
    for index in tqdm(range(config.num_layers), desc=f"loading {Path(path).name} (rank {rank})",
                      unit="layer", disable=not progress):
        prefix = f"model.layers.{index}."
        names = [n for n in params if n.startswith(prefix)]
        _give_storage(model, names, "cpu")
        _fill(model, rules, names, groups.get(index, []), skip, path, dtype)
        layer = model.model.layers[index]
        shard_layer(layer, parallel, rank)
        model.model.layers[index] = layer.to(device)  # the host copy of the layer goes now
    model = model.to(device)  # the replicated weights and rotary tables
    finish_shard(model, parallel, full_sites)
    return model.pack_for_kernels().eval(), full_sites


__all__ = ["load_shard"]
