"""Random PEFT adapters shaped for any model, for benchmarks and demos.

Written in PEFT's own formats, so the real parser and the native loader run on them:
attention via target_modules (`self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`) and experts via
transformers-5 target_parameters (`mlp.experts.base_layer.lora_*` = gate_up, `mlp.experts.lora_*`
= down; A [E*r, in], B [out, E*r]). Values are random, so the layout within the tensors (which
expert a row belongs to) does not matter here; shapes and keys do.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch
from safetensors.torch import save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_random_adapter(path: str, sites, rank: int, *, seed: int = 0, std: float = 0.02,
                         dtype: torch.dtype = torch.bfloat16,
                         device: torch.device | str = "cpu") -> str:
    """A rank-`rank` adapter on every attention and expert site of `sites` (a model's
    lora_sites()); returns `path`. Values are drawn on `device` (a GPU draws gigabytes in
    milliseconds) and written from host memory."""
    os.makedirs(path, exist_ok=True)
    config_path = os.path.join(path, "adapter_config.json")
    if os.path.exists(config_path):  # written last: its presence marks a complete adapter
        os.remove(config_path)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        values = torch.randn(*shape, generator=gen, device=device) * std
        return values.to(dtype).cpu()

    by_name = {s.name: s for s in sites}
    tensors: dict[str, torch.Tensor] = {}
    targets, params = [], []
    for name in ATTENTION:
        site = by_name.get(name)
        if site is None:
            continue
        targets.append(name)
        for layer in site.layers or range(site.num_layers):
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[key + ".lora_A.weight"] = rand(rank, site.in_dim)
            tensors[key + ".lora_B.weight"] = rand(site.out_dim, rank)
    gate, down = by_name.get("experts.gate"), by_name.get("experts.down")
    if gate is not None and down is not None:
        params = ["gate_up_proj", "down_proj"]
        experts = gate.num_experts
        for layer in gate.layers or range(gate.num_layers):
            key = f"base_model.model.model.layers.{layer}.mlp.experts"
            tensors[key + ".base_layer.lora_A.weight"] = rand(experts * rank, gate.in_dim)
            tensors[key + ".base_layer.lora_B.weight"] = rand(2 * gate.out_dim, experts * rank)
            tensors[key + ".lora_A.weight"] = rand(experts * rank, down.in_dim)
            tensors[key + ".lora_B.weight"] = rand(down.out_dim, experts * rank)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": targets, "target_parameters": params, "lora_dropout": 0.0,
              "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)
    return path


def write_adapters(adapter_dir: str, count: int, sites, rank: int, *, seed: int = 0,
                   device: torch.device | str = "cpu", prefix: str = "a") -> list[str]:
    """`count` random adapters `<adapter_dir>/<prefix><i>` (seeds seed + i). A directory that
    already holds a complete adapter of this rank is reused as it is (the config is written
    last), so a benchmark given the same --adapter-dir for the same model writes them once."""
    paths = []
    for index in range(count):
        path = os.path.join(adapter_dir, f"{prefix}{index}")
        if not _complete(path, rank):
            write_random_adapter(path, sites, rank, seed=seed + index, device=device)
        paths.append(path)
    return paths


def _complete(path: str, rank: int) -> bool:
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return config.get("r") == rank and \
        os.path.exists(os.path.join(path, "adapter_model.safetensors"))


@contextlib.contextmanager
def adapter_directory(given: str | None, prefix: str):
    """`given` (created if missing, kept), or a temporary directory removed on exit: gigabytes
    of benchmark adapters never outlive the run unless asked for."""
    if given:
        os.makedirs(given, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as path:
        yield path
