"""LoRA sites and PEFT layouts are defined once (moelora.lora.sites) and each model family
declares its layout on its class: a new family is its class and nothing else.

The reference for parsed matrices is the saved tensors themselves (delta = scale * B @ A per
expert); PEFT parity for the real families is test_lora_peft.py's.
"""

from __future__ import annotations

import json

import pytest
import torch
from moelora import lora, models
from moelora.lora.sites import EXPERT_DOWN, EXPERT_GATE, EXPERT_UP, PeftLayout, peft_layout_of
from moelora.models import FAMILY_CLASSES, REGISTRY
from moelora.models.mixtral import MixtralForCausalLM
from moelora.models.synthetic import preset_hf_config
from safetensors.torch import save_file

H, INTER, EXPERTS, LAYERS = 16, 12, 3, 2
PREFIX = "base_model.model.model.layers"


def _write(path, tensors, **config):
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    raw = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", **config}
    (path / "adapter_config.json").write_text(json.dumps(raw))
    return path


def _pair(key, rank, in_dim, out_dim, gen):
    return {f"{key}.lora_A.weight": torch.randn(rank, in_dim, generator=gen),
            f"{key}.lora_B.weight": torch.randn(out_dim, rank, generator=gen)}


def _sites():
    return [lora.LoraSiteSpec("q_proj", LAYERS, 1, H, H),
            lora.LoraSiteSpec(EXPERT_GATE, LAYERS, EXPERTS, H, INTER),
            lora.LoraSiteSpec(EXPERT_UP, LAYERS, EXPERTS, H, INTER),
            lora.LoraSiteSpec(EXPERT_DOWN, LAYERS, EXPERTS, INTER, H)]


def test_one_site_spec_for_models_and_adapters():
    assert models.LoraSiteSpec is lora.LoraSiteSpec
    hf = preset_hf_config("tiny-moe")
    cls = REGISTRY[hf["architectures"][0]]
    with torch.device("meta"):
        model = cls(cls.config_from_hf(hf))
    sites = model.lora_sites()
    assert all(type(s) is lora.LoraSiteSpec for s in sites)
    assert [s.name for s in sites if s.is_expert] == [EXPERT_GATE, EXPERT_UP, EXPERT_DOWN]
    with pytest.raises(ValueError, match="unknown LoRA site 'experts.w1'"):
        lora.LoraSiteSpec("experts.w1", 1, 2, 3, 4)


@pytest.mark.parametrize("cls", sorted(set(REGISTRY.values()), key=lambda c: c.family),
                         ids=lambda c: c.family)
def test_every_family_declares_its_layout(cls):
    assert isinstance(cls.peft_layout, PeftLayout)
    assert peft_layout_of(cls.family) is cls.peft_layout
    assert FAMILY_CLASSES[cls.family] is cls
    moe = cls.family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
    assert bool(cls.peft_layout.expert_modules) == moe
    assert cls.peft_layout.gate_up_interleaved == (cls.family == "gpt_oss")


def test_family_names_and_aliases():
    assert peft_layout_of("GptOss") is FAMILY_CLASSES["gpt_oss"].peft_layout
    assert peft_layout_of("mistral") is FAMILY_CLASSES["llama"].peft_layout
    with pytest.raises(ValueError, match="unknown architecture family 'falcon'"):
        peft_layout_of("falcon")


class _NewFamily(MixtralForCausalLM):
    """A family this package has never heard of: its own attention and expert module names."""

    family = "new_family"
    architectures = ("NewFamilyForCausalLM",)
    peft_layout = PeftLayout(
        modules={"attention.wq": "q_proj"},
        expert_modules=("feed_forward.experts",),
        per_expert_names={"w_in": EXPERT_GATE, "w_gate": EXPERT_UP, "w_out": EXPERT_DOWN},
    )


def test_a_new_family_is_its_class_and_nothing_else(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors, keys = {}, {}
    for layer in range(LAYERS):
        keys[("q_proj", layer, 0)] = f"{PREFIX}.{layer}.attention.wq"
        for e in range(EXPERTS):
            for name, site in _NewFamily.peft_layout.per_expert_names.items():
                keys[(site, layer, e)] = f"{PREFIX}.{layer}.feed_forward.experts.{e}.{name}"
    for (site, _, _), key in keys.items():
        in_dim, out_dim = (INTER, H) if site == EXPERT_DOWN else (H, INTER if "experts" in site
                                                                   else H)
        tensors |= _pair(key, 4, in_dim, out_dim, gen)
    path = _write(tmp_path / "adapter", tensors)
    dense = lora.load_dense(lora.load_adapter_plan(path, _sites(), _NewFamily.peft_layout))
    for (site, layer, expert), key in keys.items():
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        got_a, got_b = dense[site][layer]
        torch.testing.assert_close(got_b[expert] @ got_a[expert], 2.0 * b @ a)
    # the same keys mean nothing to Mixtral's layout
    with pytest.raises(lora.AdapterValidationError, match="attention.wq.lora_A.weight' targets"):
        lora.load_adapter_plan(path, _sites(), "mixtral")


def test_expert_modules_are_the_familys_own(tmp_path):
    """Mixtral's transformers-4 block_sparse_moe experts are not a Qwen layout."""
    gen = torch.Generator().manual_seed(4)
    path = _write(tmp_path / "a", _pair(f"{PREFIX}.0.block_sparse_moe.experts.1.w1", 4, H, INTER,
                                        gen))
    plan = lora.load_adapter_plan(path, _sites(), "mixtral")
    assert plan.ranks[EXPERT_GATE] == [4, 0]
    with pytest.raises(lora.AdapterValidationError, match="targets a module"):
        lora.load_adapter_plan(path, _sites(), "qwen3_moe")
