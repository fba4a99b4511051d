"""LoRA sites: the places in a model where an adapter may add a low-rank delta.

A model lists its sites with `lora_sites()`; the adapter parser takes that list (plus the
architecture family name) and never imports the model code, so the two stay independent.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_SITES = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_SITES = ("gate_proj", "up_proj", "down_proj")
SHARED_EXPERT_SITES = (
    "shared_expert.gate_proj",
    "shared_expert.up_proj",
    "shared_expert.down_proj",
)
EXPERT_SITES = ("experts.gate", "experts.up", "experts.down")
ALL_SITE_NAMES = ATTENTION_SITES + DENSE_MLP_SITES + SHARED_EXPERT_SITES + EXPERT_SITES


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
        for field in ("num_layers", "num_experts", "in_dim", "out_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"LoraSiteSpec {self.name!r}: {field} must be >= 1")
        if any(not 0 <= i < self.num_layers for i in self.layers):
            raise ValueError(f"LoraSiteSpec {self.name!r}: layers {self.layers} out of range")

    def has_layer(self, layer: int) -> bool:
        return 0 <= layer < self.num_layers and (not self.layers or layer in self.layers)

    @property
    def is_expert(self) -> bool:
        return self.name in EXPERT_SITES


def site_table(sites) -> dict[str, LoraSiteSpec]:
    """Index a model's site list by name, accepting any object with the LoraSiteSpec fields
    (the model side defines its own dataclass of the same shape)."""
    table: dict[str, LoraSiteSpec] = {}
    for site in sites:
        spec = LoraSiteSpec(
            site.name,
            site.num_layers,
            site.num_experts,
            site.in_dim,
            site.out_dim,
            tuple(getattr(site, "layers", ()) or ()),
        )
        if spec.name in table:
            raise ValueError(f"LoRA site {spec.name!r} listed twice")
        table[spec.name] = spec
    return table
