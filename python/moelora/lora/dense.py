"""Dense float32 LoRA matrices for the reference model path.

Reads each saved tensor once and takes every matrix through the plan's own strided views, so
the reference path checks the very offsets and strides the native adapter cache will copy.
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from moelora.lora.plan import AdapterPlan, per_expert_sources
from moelora.lora.validate import AdapterValidationError

DenseLora = dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]


def load_dense(plan: AdapterPlan) -> DenseLora:
    """{site: {layer: (A [E, r, in], B [E, out, r])}} in float32, scaling folded into B.

    E is the site's expert count (1 for dense sites); experts without tensors stay zero.
    Only (site, layer) pairs with a nonzero rank appear.
    """
    out: DenseLora = {}
    for site, per_layer in plan.ranks.items():
        spec = plan.sites[site]
        for layer, rank in enumerate(per_layer):
            if rank:
                out.setdefault(site, {})[layer] = (
                    torch.zeros(spec.num_experts, rank, spec.in_dim),
                    torch.zeros(spec.num_experts, spec.out_dim, rank),
                )
    flat_cache: dict[str, torch.Tensor] = {}
    for src in per_expert_sources(plan.sources):
        flat = flat_cache.get(src.tensor)
        if flat is None:
            flat = _read_flat(plan, src.file_index, src.tensor)
            flat_cache[src.tensor] = flat
        view = torch.as_strided(
            flat, (src.rows, src.cols), (src.row_stride, src.col_stride), src.offset
        )
        a, b = out[src.site][src.layer]
        if src.is_b:
            b[src.expert] = view.t() * src.scale
        else:
            a[src.expert] = view * src.scale
    return out


def _read_flat(plan: AdapterPlan, file_index: int, name: str) -> torch.Tensor:
    with safe_open(str(plan.files[file_index]), framework="pt") as f:
        tensor = f.get_tensor(name)
    if not torch.isfinite(tensor).all():
        raise AdapterValidationError(plan.name, f"tensor {name!r} contains NaN or Inf values")
    return tensor.float().contiguous().reshape(-1)
