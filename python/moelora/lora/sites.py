"""LoRA sites, the places in a model where an adapter may add a low-rank delta, and the PEFT
layout that names them in a saved adapter. Defined here once; models import them.

A model lists its sites with `lora_sites()` and its class declares its `peft_layout`; the adapter
parser takes both and never needs the model's code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_SITES = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_SITES = ("gate_proj", "up_proj", "down_proj")
SHARED_EXPERT_PREFIX = "shared_expert."
SHARED_EXPERT_SITES = tuple(SHARED_EXPERT_PREFIX + name for name in DENSE_MLP_SITES)
EXPERT_GATE, EXPERT_UP, EXPERT_DOWN = EXPERT_SITES = ("experts.gate", "experts.up",
                                                      "experts.down")
ALL_SITE_NAMES = ATTENTION_SITES + DENSE_MLP_SITES + SHARED_EXPERT_SITES + EXPERT_SITES
# A pseudo-site: one fused 3D gate_up target that feeds experts.gate and experts.up.
FUSED_GATE_UP = "experts.gate_up"


@dataclass(frozen=True)
class LoraSiteSpec:
    """One adaptable projection, repeated over `num_layers` layers and `num_experts` experts.

    `num_experts` is 1 for dense projections (attention, dense MLP, shared expert). The delta
    maps `in_dim` inputs to `out_dim` outputs: y += x @ A^T @ B^T with A [r, in], B [out, r].
    """

    name: str
    num_layers: int
    num_experts: int
    in_dim: int
    out_dim: int
    layers: tuple[int, ...] = ()  # layers where the site exists (empty: all), e.g. MoE layers

    def __post_init__(self) -> None:
        if self.name not in ALL_SITE_NAMES:
            raise ValueError(f"unknown LoRA site {self.name!r}; known sites: {ALL_SITE_NAMES}")
        for name in ("num_layers", "num_experts", "in_dim", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoraSiteSpec {self.name!r}: {name} must be >= 1")
        if any(not 0 <= i < self.num_layers for i in self.layers):
            raise ValueError(f"LoraSiteSpec {self.name!r}: layers {self.layers} out of range")

    def has_layer(self, layer: int) -> bool:
        return 0 <= layer < self.num_layers and (not self.layers or layer in self.layers)

    @property
    def is_expert(self) -> bool:
        return self.name in EXPERT_SITES


def site_table(sites) -> dict[str, LoraSiteSpec]:
    """A model's site list by name; any object with the LoraSiteSpec fields is accepted."""
    table: dict[str, LoraSiteSpec] = {}
    for site in sites:
        spec = site if isinstance(site, LoraSiteSpec) else LoraSiteSpec(
            site.name, site.num_layers, site.num_experts, site.in_dim, site.out_dim,
            tuple(getattr(site, "layers", ()) or ()))
        if spec.name in table:
            raise ValueError(f"LoRA site {spec.name!r} listed twice")
        table[spec.name] = spec
    return table


# ---- PEFT layouts -----------------------------------------------------------------------------

# HF's module names (inside `model.layers.{L}.`) of the dense projections, as PEFT's
# target_modules saves them; every family moelora serves names them so.
STANDARD_MODULES: dict[str, str] = {
    **{f"self_attn.{name}": name for name in ATTENTION_SITES},
    **{f"mlp.{name}": name for name in DENSE_MLP_SITES + SHARED_EXPERT_SITES},
}
# transformers-5 3D expert parameters and the sites they feed.
STANDARD_EXPERT_PARAMS: dict[str, str] = {"gate_up_proj": FUSED_GATE_UP,
                                          "down_proj": EXPERT_DOWN}


@dataclass(frozen=True)
class PeftLayout:
    """How PEFT names one model family's adaptable modules in a saved adapter, whose keys read
    `base_model.model.model.layers.{L}.<module>.lora_{A,B}.weight`. Each CausalLM class
    declares its own (`peft_layout`), next to its checkpoint rules.

    modules           <module> of each 2D target (nn.Linear, target_modules) -> site.
    expert_modules    <module> of the block holding the experts.
    per_expert_names  transformers-4 layout: one linear per expert, `<expert module>.{e}.<name>`,
                      name -> site.
    expert_params     transformers-5 layout: the experts module's 3D parameters in registration
                      order (target_parameters). PEFT nests one wrapper per targeted parameter,
                      the first registered innermost, so the order places the saved tensors.
    param_sites       which of those parameters an adapter may target, -> site (FUSED_GATE_UP
                      for a fused gate/up stack).
    gate_up_interleaved  the fused gate/up rows alternate gate, up (GPT-OSS) instead of
                      [gate; up].
    """

    modules: dict[str, str] = field(default_factory=lambda: dict(STANDARD_MODULES))
    expert_modules: tuple[str, ...] = ()
    per_expert_names: dict[str, str] = field(default_factory=dict)
    expert_params: tuple[str, ...] = ()
    param_sites: dict[str, str] = field(default_factory=lambda: dict(STANDARD_EXPERT_PARAMS))
    gate_up_interleaved: bool = False


_FAMILY_ALIASES = {"gptoss": "gpt_oss", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                   "mistral": "llama"}


def peft_layout_of(family: str) -> PeftLayout:
    """The PEFT layout that the model class of architecture family `family` declares."""
    from moelora.models import FAMILY_CLASSES  # the model classes declare the layouts

    key = family.lower().replace("-", "_")
    key = _FAMILY_ALIASES.get(key, key)
    if key not in FAMILY_CLASSES:
        raise ValueError(f"unknown architecture family {family!r}; known: "
                         f"{sorted(FAMILY_CLASSES)}")
    return FAMILY_CLASSES[key].peft_layout
