"""Saved PEFT tensor keys -> (site, layer, expert, A/B), per architecture family.

Layouts verified with peft 0.21.2 + transformers 5.24 on tiny models of every family
(tests/python/test_lora_peft.py re-checks them against merge_and_unload):

* target_modules (nn.Linear): `base_model.model.model.layers.{L}.self_attn.q_proj.lora_A.weight`
  is A [r, in], `...lora_B.weight` is B [out, r]; delta W = scale * B @ A.
  Dense MLP: `mlp.{gate,up,down}_proj`; Qwen2-MoE shared expert: `mlp.shared_expert.{..}_proj`.
* transformers-4 per-expert checkpoints (hand-written or older peft): one 2D pair per expert,
  Mixtral `block_sparse_moe.experts.{e}.w1|w3|w2` (gate|up|down), Qwen2/3-MoE and OLMoE
  `mlp.experts.{e}.gate_proj|up_proj|down_proj`.
* transformers-5 3D experts via target_parameters: every family stores its experts in one
  module `mlp.experts` with `gate_up_proj` and `down_proj` parameters. peft wraps each targeted
  parameter in a ParamWrapper nested around the module; the wrapper made first (the parameter
  registered first in the module: gate_up_proj) ends up innermost, so its tensors are saved as
  `mlp.experts.base_layer.lora_A.weight` and the outer one's (down_proj) as
  `mlp.experts.lora_A.weight` -- whatever the order in target_parameters. With one targeted
  parameter there is no `base_layer`. Nesting depth d maps to the (-1-d)-th targeted parameter.
  A is [E*r, in] with rows expert-major (row e*r + k); B is [out, E*r] with columns rank-major
  (column k*E + e). peft normalises orientation: in/out are the math dims for every family,
  whether the base parameter is [E, out, in] (Mixtral, Qwen, OLMoE: x @ W[e].T) or
  [E, in, out] (GPT-OSS, `is_transposed`: x @ W[e]); so A/B shapes are the same for both.
* fused gate_up output rows: Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE concatenate [gate; up]
  (first I rows gate); GPT-OSS interleaves them (even rows gate, odd rows up), so its B rows
  for gate are 0, 2, 4, ... and for up 1, 3, 5, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moelora.lora.sites import ATTENTION_SITES, DENSE_MLP_SITES, SHARED_EXPERT_SITES
from moelora.lora.validate import AdapterValidationError

ALL_EXPERTS = -1  # a 3D tensor holding every expert's factors
FUSED_GATE_UP = "experts.gate_up"  # pseudo-site: one 3D target feeding experts.gate and .up


@dataclass(frozen=True)
class Family:
    per_expert_names: dict[str, str]  # per-expert module name -> site
    expert_params: tuple[str, ...]  # 3D expert parameters in registration order
    gate_up_interleaved: bool  # fused gate_up rows: interleaved (GPT-OSS) or [gate; up]


_QWEN_EXPERT_NAMES = {
    "gate_proj": "experts.gate", "up_proj": "experts.up", "down_proj": "experts.down"
}  # fmt: skip
_MIXTRAL_EXPERT_NAMES = {"w1": "experts.gate", "w3": "experts.up", "w2": "experts.down"}
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_DENSE = Family({}, (), False)
FAMILIES = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "mixtral": Family(_MIXTRAL_EXPERT_NAMES, _EXPERT_PARAMS, False),
    "qwen2_moe": Family(_QWEN_EXPERT_NAMES, _EXPERT_PARAMS, False),
    "qwen3_moe": Family(_QWEN_EXPERT_NAMES, _EXPERT_PARAMS, False),
    "olmoe": Family(_QWEN_EXPERT_NAMES, _EXPERT_PARAMS, False),
    "gpt_oss": Family(
        {}, ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"), True
    ),
}
_PARAM_SITES = {"gate_up_proj": FUSED_GATE_UP, "down_proj": "experts.down"}

_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<rest>.+?))"
    r"\.lora_(?P<ab>[AB])\.weight$"
)
_EXPERTS_MODULE_RE = re.compile(r"^(?:mlp|block_sparse_moe)\.experts$")
_PER_EXPERT_RE = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\.(?P<name>\w+)$")


def family_of(name: str) -> Family:
    key = name.lower().replace("-", "_")
    key = {"gptoss": "gpt_oss", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(key, key)
    if key not in FAMILIES:
        raise ValueError(f"unknown architecture family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[key]


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


def classify_keys(keys, family: Family, config, adapter: str) -> list[TargetKey]:
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
        parts = rest.split(".")
        site = None
        expert = 0
        if _EXPERTS_MODULE_RE.match(rest) and family.expert_params:
            nested.setdefault(module, {}).setdefault(depth, []).append((key, layer, is_b))
            continue
        if depth == 0 and len(parts) == 2 and parts[0] == "self_attn":
            site = parts[1] if parts[1] in ATTENTION_SITES else None
        elif depth == 0 and len(parts) == 2 and parts[0] == "mlp":
            site = parts[1] if parts[1] in DENSE_MLP_SITES else None
        elif depth == 0 and len(parts) == 3 and parts[:2] == ["mlp", "shared_expert"]:
            name = f"shared_expert.{parts[2]}"
            site = name if name in SHARED_EXPERT_SITES else None
        elif depth == 0 and (pm := _PER_EXPERT_RE.match(rest)):
            site = family.per_expert_names.get(pm["name"])
            expert = int(pm["e"])
        if site is None:
            raise AdapterValidationError(adapter, _explain_unknown(key))
        out.append(TargetKey(key, site, layer, expert, is_b, module))
    for module, by_depth in nested.items():
        out.extend(_resolve_nested(module, by_depth, family, config, adapter))
    return out


def _resolve_nested(module, by_depth, family, config, adapter) -> list[TargetKey]:
    targeted = [p for p in family.expert_params if config.targets_parameter(module, p)]
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
        if param not in _PARAM_SITES:
            raise AdapterValidationError(
                adapter,
                f"target parameter {module}.{param} (tensor {entries[0][0]!r}) is "
                "not supported; only gate_up_proj and down_proj can be adapted",
            )
        for key, layer, is_b in entries:
            out.append(
                TargetKey(key, _PARAM_SITES[param], layer, ALL_EXPERTS, is_b, f"{module}.{param}")
            )
    return out
