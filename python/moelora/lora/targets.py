"""Saved PEFT tensor keys -> (site, layer, expert, A/B), by the family's PeftLayout.

The layout names (lora/sites.py PeftLayout, declared by each model class) say which module
paths are which sites; this module knows how PEFT saves them. Verified with peft 0.21.2 +
transformers 5.24 on tiny models of every family (tests/python/test_lora_peft.py re-checks them
against merge_and_unload):

* target_modules (nn.Linear): `base_model.model.model.layers.{L}.self_attn.q_proj.lora_A.weight`
  is A [r, in], `...lora_B.weight` is B [out, r]; delta W = scale * B @ A.
* transformers-4 per-expert checkpoints (hand-written or older peft): one 2D pair per expert,
  `<expert module>.{e}.<name>`.
* transformers-5 3D experts via target_parameters: the experts are one module with 3D
  parameters (`gate_up_proj`, `down_proj`, ...). peft wraps each targeted parameter in a
  ParamWrapper nested around the module; the wrapper made first (the parameter registered first
  in the module) ends up innermost, so with gate_up_proj and down_proj targeted the former's
  tensors are saved as `mlp.experts.base_layer.lora_A.weight` and the latter's as
  `mlp.experts.lora_A.weight` -- whatever the order in target_parameters. With one targeted
  parameter there is no `base_layer`. Nesting depth d maps to the (-1-d)-th targeted parameter.
  A is [E*r, in] with rows expert-major (row e*r + k); B is [out, E*r] with columns rank-major
  (column k*E + e). peft normalises orientation: in/out are the math dims whether the base
  parameter is [E, out, in] (x @ W[e].T) or [E, in, out] (`is_transposed`: x @ W[e]); so A/B
  shapes are the same for both.
* fused gate_up output rows are [gate; up] (first I rows gate), or interleaved (even rows gate,
  odd rows up) where the layout says gate_up_interleaved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moelora.lora.sites import PeftLayout
from moelora.lora.validate import AdapterValidationError

ALL_EXPERTS = -1  # a 3D tensor holding every expert's factors

_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<rest>.+?))"
    r"\.lora_(?P<ab>[AB])\.weight$"
)
_PER_EXPERT_RE = re.compile(r"^(?P<experts>.+)\.(?P<e>\d+)\.(?P<name>\w+)$")


@dataclass(frozen=True)
class TargetKey:
    """One saved tensor. `site` is FUSED_GATE_UP for a fused 3D gate_up target;
    `module_key` is the name PEFT matches rank/alpha patterns against."""

    key: str
    site: str
    layer: int
    expert: int  # expert index, 0 for dense sites, ALL_EXPERTS for 3D tensors
    is_b: bool
    module_key: str


def _explain_unknown(key: str) -> str:
    if key.endswith(".lora_B.bias"):
        return f"tensor {key!r} is a LoRA bias (lora_bias), which is not supported"
    if "lora_magnitude_vector" in key:
        return f"tensor {key!r} is a DoRA magnitude vector; DoRA is not supported"
    if "lora_embedding_" in key:
        return f"tensor {key!r} adapts an embedding, which is not supported"
    return f"tensor {key!r} targets a module this runtime cannot adapt (unknown target)"


def classify_keys(keys, layout: PeftLayout, config, adapter: str) -> list[TargetKey]:
    """Map every saved tensor key to its target, resolving 3D nesting through the config's
    target_parameters. Raises AdapterValidationError naming the first key it cannot place."""
    out: list[TargetKey] = []
    nested: dict[str, dict[int, list]] = {}  # experts module -> depth -> [(key, layer, is_b)]
    for key in keys:
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterValidationError(adapter, _explain_unknown(key))
        layer, is_b, rest = int(m["layer"]), m["ab"] == "B", m["rest"]
        module = m["module"]
        depth = 0
        while rest.endswith(".base_layer"):
            rest, module, depth = (
                rest[: -len(".base_layer")],
                module[: -len(".base_layer")],
                depth + 1,
            )
        if rest in layout.expert_modules and layout.expert_params:
            nested.setdefault(module, {}).setdefault(depth, []).append((key, layer, is_b))
            continue
        site = None
        expert = 0
        if depth == 0 and rest in layout.modules:
            site = layout.modules[rest]
        elif depth == 0 and (pm := _PER_EXPERT_RE.match(rest)) and \
                pm["experts"] in layout.expert_modules:
            site = layout.per_expert_names.get(pm["name"])
            expert = int(pm["e"])
        if site is None:
            raise AdapterValidationError(adapter, _explain_unknown(key))
        out.append(TargetKey(key, site, layer, expert, is_b, module))
    for module, by_depth in nested.items():
        out.extend(_resolve_nested(module, by_depth, layout, config, adapter))
    return out


def _resolve_nested(module, by_depth, layout: PeftLayout, config, adapter) -> list[TargetKey]:
    targeted = [p for p in layout.expert_params if config.targets_parameter(module, p)]
    depths = sorted(by_depth)
    if len(targeted) != len(depths) or depths != list(range(len(depths))):
        first_key = by_depth[depths[0]][0][0]
        raise AdapterValidationError(
            adapter,
            f"3D expert tensors of {module!r} (e.g. {first_key!r}) do not match "
            f"target_parameters={config.target_parameters}: found {len(depths)} nested "
            f"LoRA wrappers for {len(targeted)} targeted parameters {targeted}",
        )
    out = []
    for depth, entries in by_depth.items():
        param = targeted[-1 - depth]
        if param not in layout.param_sites:
            raise AdapterValidationError(
                adapter,
                f"target parameter {module}.{param} (tensor {entries[0][0]!r}) is "
                f"not supported; only {' and '.join(layout.param_sites)} can be adapted",
            )
        for key, layer, is_b in entries:
            out.append(
                TargetKey(key, layout.param_sites[param], layer, ALL_EXPERTS, is_b, f"{module}.{param}")
            )
    return out
