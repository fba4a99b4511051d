"""Refuse, before building anything, a benchmark model that cannot fit the machine.

A synthetic mixtral-8x7b of 8 layers in float32 is ~45 GB: on a smaller host it dies in the
allocator minutes in, with no hint of what to change. The estimate here comes from the model's
config alone (weight_bytes.py) and the device's free memory; a model that does not fit is refused
with the numbers and the flags that would make it fit.

On a GPU the engine reserves gpu_memory_utilization of the card (less what other processes use)
for the weights, the page pool (KV and adapters) and ACTIVATION_RESERVE_BYTES; on the CPU the
weights and the host pool (CPU_DEFAULT_POOL_BYTES) live in the process's memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moelora.bench.weight_bytes import WeightLayout, fixed_weight_bytes, model_weight_bytes

GB = 1e9


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    num_layers: int
    dtype: torch.dtype
    weight_bytes: float
    extra_bytes: float  # pool, adapters, activations
    available_bytes: float
    where: str  # "cuda:0 (NVIDIA H100 ...)" or "host memory"

    @property
    def need_bytes(self) -> float:
        return self.weight_bytes + self.extra_bytes

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.available_bytes


def model_config_of(model: str, num_layers: int | None = None):
    """The ModelConfig of `synthetic:<preset>` or an HF directory, without building the model."""
    from moelora.models import model_class

    if model.startswith("synthetic:"):
        from moelora.models.synthetic import preset_hf_config

        hf = preset_hf_config(model.removeprefix("synthetic:"), num_layers)
    else:
        from moelora.models.loader import read_hf_config

        hf = read_hf_config(model)
    config = model_class((hf.get("architectures") or [""])[0]).config_from_hf(hf)
    if num_layers is not None and config.num_layers != num_layers:
        config = config.with_num_layers(num_layers)
    return config


def engine_dtype(model: str, dtype: str, device: str) -> torch.dtype:
    """The dtype the engine will pick for these flags (EngineConfig's rule)."""
    from moelora.engine.config import EngineConfig
    from moelora.engine.executor import checkpoint_dtype

    config = EngineConfig(model=model, dtype=dtype, device=device)
    return config.torch_dtype(checkpoint_dtype(model))  # None for a synthetic model


def available_bytes(device: torch.device, gpu_memory_utilization: float = 0.85
                    ) -> tuple[float, str]:
    """(bytes the engine may use on `device`, a description of where)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        in_use_by_others = total - free - torch.cuda.memory_reserved(device)
        usable = total * gpu_memory_utilization - in_use_by_others
        return usable, (f"{device} ({torch.cuda.get_device_name(device)}, "
                        f"{gpu_memory_utilization:.2f} of {total / GB:.1f} GB)")
    return host_available_bytes(), "host memory"


def host_available_bytes() -> float:
    """MemAvailable of /proc/meminfo (free + reclaimable), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_extra_bytes(device: torch.device) -> float:
    """What the engine needs beside the weights when nothing else is said: the CPU's default
    pool, or on a GPU the activation reserve."""
    from moelora.engine.memory import ACTIVATION_RESERVE_BYTES, CPU_DEFAULT_POOL_BYTES

    return float(ACTIVATION_RESERVE_BYTES if device.type == "cuda" else CPU_DEFAULT_POOL_BYTES)


def plan_memory(model: str, num_layers: int | None, dtype: torch.dtype, device: torch.device,
                weights: str = "bf16", extra_bytes: float = 0.0,
                gpu_memory_utilization: float = 0.85,
                available: tuple[float, str] | None = None) -> MemoryPlan:
    """The memory the model needs on `device` against what is available (`available` overrides
    the measurement: (bytes, where)). `weights`: bf16 (unquantized, in `dtype`), mxfp4 or fp8."""
    config = model_config_of(model, num_layers)
    avail, where = available or available_bytes(device, gpu_memory_utilization)
    return MemoryPlan(model, config.num_layers, dtype,
                      model_weight_bytes(config, WeightLayout.of(weights, dtype)),
                      default_extra_bytes(device) + extra_bytes, avail, where)


def refusal(plan: MemoryPlan, weights: str = "bf16") -> str:
    """The message that refuses `plan`: its numbers and what to change."""
    config = model_config_of(plan.model, plan.num_layers)
    layout = WeightLayout.of(weights, plan.dtype)
    fixed = fixed_weight_bytes(config, layout)
    per_layer = (plan.weight_bytes - fixed) / plan.num_layers
    fit_layers = int((plan.available_bytes - plan.extra_bytes - fixed) // per_layer)
    hints = []
    if plan.model.startswith("synthetic:") and 1 <= fit_layers < plan.num_layers:
        hints.append(f"--num-layers {fit_layers} or fewer (about {per_layer / GB:.2f} GB a "
                     f"layer)")
    if plan.dtype == torch.float32:
        half = plan.weight_bytes / 2 + plan.extra_bytes
        hints.append(f"--dtype bfloat16 (about {half / GB:.1f} GB)")
    if not hints:
        hints.append("a machine with more memory")
    dtype_name = str(plan.dtype).removeprefix("torch.")
    return (f"{plan.model} with {plan.num_layers} layers in {dtype_name} needs about "
            f"{plan.need_bytes / GB:.1f} GB ({plan.weight_bytes / GB:.1f} GB of weights + "
            f"{plan.extra_bytes / GB:.1f} GB for the page pool, adapters and activations) but "
            f"{plan.where} has {max(plan.available_bytes, 0.0) / GB:.1f} GB available; use "
            + " or ".join(hints))


def check_model_fits(model: str, num_layers: int | None, dtype: str, device: str,
                     weights: str = "bf16", extra_bytes: float = 0.0,
                     gpu_memory_utilization: float = 0.85) -> MemoryPlan:
    """Raises SystemExit naming the numbers when the model cannot fit; returns the plan."""
    from moelora.engine.config import EngineConfig

    torch_device = EngineConfig(model=model, dtype=dtype, device=device).torch_device()
    torch_dtype = engine_dtype(model, dtype, device)
    plan = plan_memory(model, num_layers, torch_dtype, torch_device, weights, extra_bytes,
                       gpu_memory_utilization)
    if not plan.fits:
        raise SystemExit(refusal(plan, weights))
    return plan


def lora_sites_of(model: str, num_layers: int | None = None) -> list:
    """The model's LoRA sites from its config alone (the model is built on the meta device:
    no memory, no weights)."""
    from moelora.models import model_class

    config = model_config_of(model, num_layers)
    with torch.device("meta"):
        return model_class(config.architecture)(config).lora_sites()
