"""The plan of a step (include/moelora/plan.h): every kernel choice the ops make.

A caller plans once per step, from the step's shape and the device, and hands the plan to the
ops of that step (flashinfer's plan/run); an op given no plan makes one for its call. Plans are
made in C++ (one set of rules and thresholds, src/plan.cpp); their fields read as ints, bools and
names. Tests and benchmarks force a choice with ``PlanOverrides(lora_kernel="mma", ...)``.
"""

from __future__ import annotations

import functools

import torch

from moelora import _C
from moelora._tensor import dtype_code

DeviceProps = _C.DeviceProps
PlanOverrides = _C.PlanOverrides
LoraPlan = _C.LoraPlan
AttentionPlan = _C.AttentionPlan

_NO_OVERRIDES = PlanOverrides()


@functools.cache
def _cuda_props(index: int) -> DeviceProps:
    return _C.device_props(True, index)


def device_props(device: torch.device | str | DeviceProps) -> DeviceProps:
    """The properties a plan depends on (SM count, compute capability) of `device`."""
    if isinstance(device, DeviceProps):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        return _C.device_props(False)
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())


def plan_lora(
    num_pairs: int,
    *,
    num_experts: int = 1,
    num_adapters: int | None = None,
    dense: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | DeviceProps = "cpu",
    overrides: PlanOverrides | None = None,
) -> LoraPlan:
    """The LoRA plan of a step: `num_pairs` (token, expert) pairs over `num_experts` experts
    (a dense site: dense=True, rows), `num_adapters` distinct adapters among its tokens (None:
    unknown). Fields: form, block_m, align_kernel, lora_kernel, unaligned_kernel, pdl,
    cluster_max, mma_split."""
    return _C.plan_lora(
        num_pairs=num_pairs,
        num_experts=num_experts,
        num_adapters=num_adapters or 0,
        dense=dense,
        dtype=dtype_code(dtype),
        device=device_props(device),
        overrides=overrides or _NO_OVERRIDES,
    )


def plan_attention(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_bytes: int,
    max_context: int,
    dtype: torch.dtype,
    device: torch.device | str | DeviceProps,
    overrides: PlanOverrides | None = None,
) -> AttentionPlan:
    """The attention plan of a step: the paged kernel its shape fits (`kernel`), the split-KV
    factor (`splits`, 0: by each launch's size) and how prefill spans attend
    (`prefill_attention`: "sdpa" or "paged"). max_context: keys the block table addresses."""
    return _C.plan_attention(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_bytes=page_bytes,
        max_context=max_context,
        dtype=dtype_code(dtype),
        device=device_props(device),
        overrides=overrides or _NO_OVERRIDES,
    )
