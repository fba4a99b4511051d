"""moelora.lora against real PEFT adapters (peft + transformers are test-only dependencies).

For every family we build a tiny random HF model, train-free PEFT adapter with
`init_lora_weights=False` (nonzero A and B), save it, parse it with moelora.lora, and check
that B @ A from our dense matrices equals merge_and_unload()'s weight minus the base weight,
per expert for 3D expert parameters.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from moelora.lora import (
    AdapterValidationError,
    LoraSiteSpec,
    load_adapter_plan,
    load_dense,
    per_expert_sources,
)
from packaging.version import Version
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

H, I_DENSE, I_MOE, I_SHARED, E, LAYERS = 16, 24, 12, 20, 4, 2
COMMON = {
    "hidden_size": H,
    "intermediate_size": I_DENSE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "vocab_size": 64,
}
MOE = {"num_experts_per_tok": 2}
FAMILY_CONFIGS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mixtral": dict(num_local_experts=E, **MOE),
    "qwen2_moe": dict(
        num_experts=E,
        moe_intermediate_size=I_MOE,
        shared_expert_intermediate_size=I_SHARED,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **MOE,
    ),
    "qwen3_moe": dict(
        num_experts=E,
        moe_intermediate_size=I_MOE,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **MOE,
    ),
    "olmoe": dict(num_experts=E, **MOE),
    "gpt_oss": dict(
        num_local_experts=E, layer_types=["full_attention", "sliding_attention"], **MOE
    ),
}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny_model(family: str):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(family, **COMMON, **FAMILY_CONFIGS[family])
    return transformers.AutoModelForCausalLM.from_config(cfg).float().eval(), cfg


def sites_for(family: str, cfg) -> list[LoraSiteSpec]:
    """What the model side's lora_sites() reports, derived here from the HF config."""
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    L = cfg.num_hidden_layers
    sites = [
        LoraSiteSpec("q_proj", L, 1, H, q_out),
        LoraSiteSpec("k_proj", L, 1, H, kv_out),
        LoraSiteSpec("v_proj", L, 1, H, kv_out),
        LoraSiteSpec("o_proj", L, 1, q_out, H),
    ]
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if not experts:
        return sites + dense_mlp_sites("", L, cfg.intermediate_size)
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    sites += [
        LoraSiteSpec("experts.gate", L, experts, H, inter),
        LoraSiteSpec("experts.up", L, experts, H, inter),
        LoraSiteSpec("experts.down", L, experts, inter, H),
    ]
    if family == "qwen2_moe":
        sites += dense_mlp_sites("shared_expert.", L, cfg.shared_expert_intermediate_size)
    return sites


def dense_mlp_sites(prefix: str, layers: int, inter: int) -> list[LoraSiteSpec]:
    return [
        LoraSiteSpec(prefix + "gate_proj", layers, 1, H, inter),
        LoraSiteSpec(prefix + "up_proj", layers, 1, H, inter),
        LoraSiteSpec(prefix + "down_proj", layers, 1, inter, H),
    ]


def site_param(family: str, site: str, layer: int) -> tuple[str, str]:
    """(HF parameter name, how to turn its delta into [out, in] per expert)."""
    base = f"model.layers.{layer}."
    if site in ATTN:
        return base + f"self_attn.{site}.weight", "2d"
    if site.startswith("shared_expert.") or site in MLP:
        return base + f"mlp.{site}.weight", "2d"
    param = "down_proj" if site == "experts.down" else "gate_up_proj"
    orient = "3d_in_out" if family == "gpt_oss" else "3d_out_in"
    return base + f"mlp.experts.{param}", orient


def expected_delta(family, site, delta_param, orient, expert):
    """Slice one expert's [out, in] delta for `site` out of a parameter's merged delta."""
    if orient == "2d":
        return delta_param
    d = delta_param[expert] if orient == "3d_out_in" else delta_param[expert].t()
    if site == "experts.down":
        return d
    half = d.shape[0] // 2
    if family == "gpt_oss":  # interleaved rows: even gate, odd up
        return d[0::2] if site == "experts.gate" else d[1::2]
    return d[:half] if site == "experts.gate" else d[half:]


PEFT_CASES = {
    # family: LoraConfig kwargs
    "llama": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ATTN + MLP,
        "rank_pattern": {"layers.1.self_attn.k_proj": 6},
        "alpha_pattern": {"o_proj": 3},
    },
    "qwen2": {
        "r": 3,
        "lora_alpha": 5,
        "target_modules": r".*\.(q_proj|v_proj|down_proj)",
        "use_rslora": True,
    },
    "qwen3": {"r": 2, "lora_alpha": 4, "target_modules": ATTN + MLP, "layers_to_transform": [1]},
    "mixtral": {
        "r": 3,
        "lora_alpha": 6,
        "target_modules": ["q_proj", "v_proj"],
        "target_parameters": ["down_proj", "gate_up_proj"],
        "rank_pattern": {"layers.1.mlp.experts.down_proj": 5, "q_proj": 2},
        "alpha_pattern": {"gate_up_proj": 7},
    },
    "qwen2_moe": {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["o_proj"] + MLP,
        "target_parameters": ["gate_up_proj"],
        "rank_pattern": {"up_proj": 2},
    },
    "qwen3_moe": {
        "r": 2,
        "lora_alpha": 3,
        "target_modules": ATTN,
        "use_rslora": True,
        "target_parameters": ["gate_up_proj", "down_proj"],
    },
    "olmoe": {
        "r": 5,
        "lora_alpha": 2,
        "target_modules": ["k_proj"],
        "target_parameters": ["down_proj"],
        "alpha_pattern": {"down_proj": 9},
    },
    "gpt_oss": {
        "r": 3,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "o_proj"],
        "use_rslora": True,
        "target_parameters": ["gate_up_proj", "down_proj"],
        "rank_pattern": {"gate_up_proj": 2},
    },
}


@pytest.mark.parametrize("family", sorted(PEFT_CASES))
def test_peft_adapter_matches_merged_delta(family, tmp_path):
    model, cfg = tiny_model(family)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lora_cfg = peft.LoraConfig(init_lora_weights=False, **PEFT_CASES[family])
    peft_model = peft.get_peft_model(model, lora_cfg)
    peft_model.save_pretrained(tmp_path)
    merged = peft_model.merge_and_unload().state_dict()

    plan = load_adapter_plan(tmp_path, sites_for(family, cfg), family, max_lora_rank=8)
    dense = load_dense(plan)
    checked = set()
    for site, per_layer in dense.items():
        for layer, (a, b) in per_layer.items():
            assert a.shape[1] == b.shape[2] == plan.ranks[site][layer] > 0
            name, orient = site_param(family, site, layer)
            delta = merged[name] - base[name]
            for e in range(a.shape[0]):
                want = expected_delta(family, site, delta, orient, e)
                torch.testing.assert_close(b[e] @ a[e], want, atol=2e-5, rtol=1e-4)
            checked.add(name)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == checked, f"PEFT changed {changed - checked}, we covered {checked - changed}"
    assert checked, "the adapter targeted nothing"
    for site, ranks in EXPECTED_RANKS.get(family, {}).items():
        assert plan.ranks[site] == ranks, site
    for (site, layer), scale in EXPECTED_SCALES.get(family, {}).items():
        got = {s.scale for s in plan.sources if (s.site, s.layer, s.is_b) == (site, layer, True)}
        assert len(got) == 1 and got.pop() == pytest.approx(scale), site
    assert {s.scale for s in plan.sources if not s.is_b} == {1.0}


# From peft 0.22 target_modules also reach fused experts' 3D parameters: qwen2_moe's "down_proj"
# targets experts.down_proj (rank 4), and its fused gate_up_proj, also named in target_parameters,
# gets rank 8; before, only target_parameters did (gate_up_proj at rank 4). Either way the
# merged weights, checked above, are what the plan's A and B give.
TARGET_MODULES_REACH_EXPERTS = Version(peft.__version__) >= Version("0.22")

# rank_pattern / alpha_pattern reach 3D parameters too (peft 0.21 warns they "did not match
# any targeted module", but applies them: the key matched is `<module>.<parameter>`).
EXPECTED_RANKS = {
    "llama": {"k_proj": [4, 6], "q_proj": [4, 4], "down_proj": [4, 4]},
    "qwen2": {"k_proj": [0, 0], "down_proj": [3, 3], "gate_proj": [0, 0]},
    "mixtral": {
        "experts.down": [3, 5],
        "q_proj": [2, 2],
        "experts.gate": [3, 3],
        "experts.up": [3, 3],
        "k_proj": [0, 0],
    },
    "qwen2_moe": {
        "shared_expert.up_proj": [2, 2],
        "shared_expert.gate_proj": [4, 4],
        "experts.down": [4, 4] if TARGET_MODULES_REACH_EXPERTS else [0, 0],
        "experts.gate": [8, 8] if TARGET_MODULES_REACH_EXPERTS else [4, 4],
        "q_proj": [0, 0],
    },
    "olmoe": {"experts.down": [5, 5], "experts.gate": [0, 0]},
    "gpt_oss": {"experts.gate": [2, 2], "experts.up": [2, 2], "experts.down": [3, 3]},
}
EXPECTED_SCALES = {
    "llama": {("o_proj", 0): 3 / 4, ("k_proj", 1): 8 / 6, ("q_proj", 1): 2.0},
    "qwen2": {("v_proj", 0): 5 / math.sqrt(3)},
    "mixtral": {("experts.gate", 1): 7 / 3, ("experts.down", 1): 6 / 5, ("q_proj", 0): 3.0},
    "qwen3_moe": {("experts.up", 0): 3 / math.sqrt(2)},
    "olmoe": {("experts.down", 0): 9 / 5, ("k_proj", 1): 2 / 5},
    "gpt_oss": {("experts.gate", 0): 4 / math.sqrt(2), ("experts.down", 0): 4 / math.sqrt(3)},
}


def test_peft_layers_to_transform_leaves_other_layers_zero(tmp_path):
    model, cfg = tiny_model("qwen3")
    peft.get_peft_model(
        model, peft.LoraConfig(init_lora_weights=False, **PEFT_CASES["qwen3"])
    ).save_pretrained(tmp_path)
    plan = load_adapter_plan(tmp_path, sites_for("qwen3", cfg), "qwen3")
    assert all(ranks == [0, 2] for ranks in plan.ranks.values())


def test_fused_gate_up_views_share_a(tmp_path):
    model, cfg = tiny_model("gpt_oss")
    peft.get_peft_model(
        model, peft.LoraConfig(init_lora_weights=False, **PEFT_CASES["gpt_oss"])
    ).save_pretrained(tmp_path)
    plan = load_adapter_plan(tmp_path, sites_for("gpt_oss", cfg), "gpt_oss")
    sources = per_expert_sources(plan.sources)
    a_views = {(s.site, s.layer, s.expert): (s.tensor, s.offset) for s in sources if not s.is_b}
    b_views = [s for s in sources if s.is_b and s.site in ("experts.gate", "experts.up")]
    for e in range(E):
        assert a_views[("experts.gate", 0, e)] == a_views[("experts.up", 0, e)]
    # GPT-OSS B rows are interleaved: gate and up views step over two B rows.
    assert all(s.col_stride == 2 * E * 2 for s in b_views)
    assert {s.offset for s in b_views if s.layer == 0 and s.expert == 0} == {0, E * 2}
    assert plan.max_rank == 3


# --- hand-written adapters (transformers-4 per-expert layout, 3D layout, refusals) ---------

PREFIX = "base_model.model.model.layers"


def write_adapter(path, tensors: dict, **config):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    raw = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", **config}
    (path / "adapter_config.json").write_text(json.dumps(raw))
    return path


def moe_sites(experts=E, shared=False):
    sites = [LoraSiteSpec("q_proj", LAYERS, 1, H, H), LoraSiteSpec("o_proj", LAYERS, 1, H, H)]
    sites += [
        LoraSiteSpec("experts.gate", LAYERS, experts, H, I_MOE),
        LoraSiteSpec("experts.up", LAYERS, experts, H, I_MOE),
        LoraSiteSpec("experts.down", LAYERS, experts, I_MOE, H),
    ]
    return sites + (dense_mlp_sites("shared_expert.", LAYERS, I_SHARED) if shared else [])


def pair(key: str, r: int, in_dim: int, out_dim: int, gen, dtype=torch.float32) -> dict:
    return {
        f"{key}.lora_A.weight": torch.randn(r, in_dim, generator=gen).to(dtype),
        f"{key}.lora_B.weight": torch.randn(out_dim, r, generator=gen).to(dtype),
    }


def check_per_expert(dense, tensors, site_keys, scale_of):
    """Independent reference: delta = scale * B @ A straight from the saved tensors."""
    for (site, layer, expert), key in site_keys.items():
        a = tensors[f"{key}.lora_A.weight"].float()
        b = tensors[f"{key}.lora_B.weight"].float()
        got_a, got_b = dense[site][layer]
        torch.testing.assert_close(got_b[expert] @ got_a[expert], scale_of(key) * b @ a)


@pytest.mark.parametrize("layout", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"])
def test_transformers4_per_expert_adapter(layout, tmp_path):
    gen = torch.Generator().manual_seed(1)
    names = (
        {"w1": "experts.gate", "w3": "experts.up", "w2": "experts.down"}
        if layout == "mixtral"
        else {"gate_proj": "experts.gate", "up_proj": "experts.up", "down_proj": "experts.down"}
    )
    block = "block_sparse_moe" if layout == "mixtral" else "mlp"
    tensors, site_keys = {}, {}
    for layer in range(LAYERS):
        experts = [0, 1, 3] if layer == 0 else range(E)  # expert 2 of layer 0 untouched
        for e in experts:
            for name, site in names.items():
                r = 2 if site == "experts.down" else 4
                in_dim, out_dim = (I_MOE, H) if site == "experts.down" else (H, I_MOE)
                key = f"{PREFIX}.{layer}.{block}.experts.{e}.{name}"
                dtype = torch.bfloat16 if site == "experts.up" else torch.float32
                tensors |= pair(key, r, in_dim, out_dim, gen, dtype)
                site_keys[(site, layer, e)] = key
        tensors |= pair(f"{PREFIX}.{layer}.self_attn.q_proj", 4, H, H, gen)
        site_keys[("q_proj", layer, 0)] = f"{PREFIX}.{layer}.self_attn.q_proj"
        if layout == "qwen2_moe":
            key = f"{PREFIX}.{layer}.mlp.shared_expert.down_proj"
            tensors |= pair(key, 4, I_SHARED, H, gen)
            site_keys[("shared_expert.down_proj", layer, 0)] = key
    down = "w2" if layout == "mixtral" else "down_proj"
    # A regex key, matched like PEFT: it must not catch shared_expert.down_proj.
    pattern = {rf"experts\.\d+\.{down}": 2}
    write_adapter(tmp_path, tensors, rank_pattern=pattern, alpha_pattern={"q_proj": 3})
    plan = load_adapter_plan(tmp_path, moe_sites(shared=layout == "qwen2_moe"), layout)
    dense = load_dense(plan)

    def scale_of(key):
        if key.endswith("q_proj"):
            return 3 / 4
        return 8 / 2 if ".experts." in key and key.endswith(down) else 8 / 4

    check_per_expert(dense, tensors, site_keys, scale_of)
    assert torch.count_nonzero(dense["experts.gate"][0][0][2]) == 0
    assert plan.ranks["experts.down"] == [2, 2] and plan.ranks["experts.gate"] == [4, 4]
    assert len(plan.sources) == 2 * len(site_keys)


def test_handwritten_3d_gpt_oss_interleaved(tmp_path):
    """GPT-OSS fused gate_up B rows interleave gate (even) and up (odd); computed here from
    the raw tensors with PEFT's documented reshapes, independently of the plan's strides."""
    gen = torch.Generator().manual_seed(2)
    r, r_down = 3, 2
    mod = f"{PREFIX}.0.mlp.experts"
    tensors = {
        f"{mod}.base_layer.lora_A.weight": torch.randn(E * r, H, generator=gen),
        f"{mod}.base_layer.lora_B.weight": torch.randn(2 * I_MOE, E * r, generator=gen),
        f"{mod}.lora_A.weight": torch.randn(E * r_down, I_MOE, generator=gen),
        f"{mod}.lora_B.weight": torch.randn(H, E * r_down, generator=gen),
    }
    write_adapter(
        tmp_path,
        tensors,
        r=r,
        lora_alpha=6,
        use_rslora=True,
        target_parameters=["gate_up_proj", "down_proj"],
        rank_pattern={"down_proj": r_down},
    )
    dense = load_dense(load_adapter_plan(tmp_path, moe_sites(), "gpt_oss"))
    a = tensors[f"{mod}.base_layer.lora_A.weight"].reshape(E, r, H)
    b = tensors[f"{mod}.base_layer.lora_B.weight"].reshape(2 * I_MOE, r, E).permute(2, 0, 1)
    a2 = tensors[f"{mod}.lora_A.weight"].reshape(E, r_down, I_MOE)
    b2 = tensors[f"{mod}.lora_B.weight"].reshape(H, r_down, E).permute(2, 0, 1)
    for e in range(E):
        full = 6 / math.sqrt(r) * b[e] @ a[e]
        for site, rows in (("experts.gate", full[0::2]), ("experts.up", full[1::2])):
            got_a, got_b = dense[site][0]
            torch.testing.assert_close(got_b[e] @ got_a[e], rows)
        got_a, got_b = dense["experts.down"][0]
        torch.testing.assert_close(got_b[e] @ got_a[e], 6 / math.sqrt(r_down) * b2[e] @ a2[e])
    assert 1 not in dense["experts.gate"]


def test_mixtral_3d_single_parameter_and_concat_halves(tmp_path):
    gen = torch.Generator().manual_seed(3)
    mod = f"{PREFIX}.1.mlp.experts"
    tensors = {
        f"{mod}.lora_A.weight": torch.randn(E * 4, H, generator=gen),
        f"{mod}.lora_B.weight": torch.randn(2 * I_MOE, E * 4, generator=gen),
    }
    write_adapter(tmp_path, tensors, target_parameters=["gate_up_proj"])
    dense = load_dense(load_adapter_plan(tmp_path, moe_sites(), "mixtral"))
    a = tensors[f"{mod}.lora_A.weight"].reshape(E, 4, H)
    b = tensors[f"{mod}.lora_B.weight"].reshape(2 * I_MOE, 4, E).permute(2, 0, 1)
    for e in range(E):
        full = 2.0 * b[e] @ a[e]
        torch.testing.assert_close(
            dense["experts.gate"][1][1][e] @ dense["experts.gate"][1][0][e], full[:I_MOE]
        )
        torch.testing.assert_close(
            dense["experts.up"][1][1][e] @ dense["experts.up"][1][0][e], full[I_MOE:]
        )


def _q(layer=0, r=4, in_dim=H, out_dim=H, dtype=torch.float32, seed=4):
    return pair(
        f"{PREFIX}.{layer}.self_attn.q_proj",
        r,
        in_dim,
        out_dim,
        torch.Generator().manual_seed(seed),
        dtype,
    )


def _3d(a_rows, b_cols, nested=False, b_rows=H, in_dim=I_MOE):
    mod = f"{PREFIX}.0.mlp.experts" + (".base_layer" if nested else "")
    return {
        f"{mod}.lora_A.weight": torch.ones(a_rows, in_dim),
        f"{mod}.lora_B.weight": torch.ones(b_rows, b_cols),
    }


def _drop(tensors, suffix):
    return {k: v for k, v in tensors.items() if not k.endswith(suffix)}


def _per_expert(e, r, name="w1"):
    return pair(
        f"{PREFIX}.0.block_sparse_moe.experts.{e}.{name}",
        r,
        H,
        I_MOE,
        torch.Generator().manual_seed(e),
    )


# id: (tensors, config overrides, family, load kwargs, words the message must contain)
REFUSALS = {
    "rank_over_max": (_q(), {}, {"max_lora_rank": 2}, "exceeds max_lora_rank=2"),
    "shape_mismatch": (_q(in_dim=32), {}, {}, "expected [4, 16]"),
    "unsupported_dtype": (_q(dtype=torch.float64), {}, {}, "unsupported dtype F64"),
    "int_dtype": (
        {**_q(), f"{PREFIX}.0.x": torch.ones(2, dtype=torch.int8)},
        {},
        {},
        "unsupported dtype I8",
    ),
    "missing_b": (_drop(_q(), "lora_B.weight"), {}, {}, "no matching lora_B"),
    "missing_a": (_drop(_q(), "lora_A.weight"), {}, {}, "no matching lora_A"),
    "unknown_lm_head": (
        {**_q(), "base_model.model.lm_head.lora_A.weight": torch.ones(4, H)},
        {},
        {},
        "lm_head.lora_A.weight' targets a module",
    ),
    "unknown_router": (
        pair(f"{PREFIX}.0.mlp.gate", 4, H, E, torch.Generator()),
        {},
        {},
        "mlp.gate.lora_A.weight' targets a module",
    ),
    "dora_config": (_q(), {"use_dora": True}, {}, "DoRA"),
    "dora_tensor": (
        {**_q(), f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(H)},
        {},
        {},
        "DoRA magnitude",
    ),
    "lora_bias_config": (_q(), {"lora_bias": True}, {}, "lora_bias"),
    "lora_bias_tensor": (
        {**_q(), f"{PREFIX}.0.self_attn.q_proj.lora_B.bias": torch.ones(H)},
        {},
        {},
        "LoRA bias",
    ),
    "bias_all": (_q(), {"bias": "all"}, {}, "bias='all'"),
    "modules_to_save": (_q(), {"modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
    "not_lora": (_q(), {"peft_type": "IA3"}, {}, "only LORA"),
    "pissa": (_q(), {"init_lora_weights": "pissa"}, {}, "modifies the base weights"),
    "bad_regex": (_q(), {"rank_pattern": {"q_proj(": 2}}, {}, "not a valid regular expression"),
    "site_not_in_model": (
        pair(f"{PREFIX}.0.self_attn.k_proj", 4, H, 8, torch.Generator()),
        {},
        {},
        "site 'k_proj', which this model does not have",
    ),
    "layer_out_of_range": (_q(layer=7), {}, {}, "layer 7, but the model has 2 layers"),
    "expert_out_of_range": (_per_expert(9, 4), {}, {}, "expert 9, but the model has 4"),
    "rank_vs_config": (_q(r=4), {"r": 2}, {}, "has rank 4 but adapter_config.json"),
    "mixed_expert_ranks": (
        {**_per_expert(0, 4), **_per_expert(1, 2)},
        {"rank_pattern": {r"experts\.1\.w1": 2}},
        {},
        "ranks must agree across experts",
    ),
    "3d_without_target_parameters": (_3d(4 * E, 4 * E), {}, {}, "do not match target_parameters"),
    "3d_extra_nesting": (
        {**_3d(4 * E, 4 * E), **_3d(4 * E, 4 * E, nested=True)},
        {"target_parameters": ["down_proj"]},
        {},
        "2 nested LoRA wrappers",
    ),
    "3d_rows_not_multiple": (
        _3d(7, 7),
        {"r": 4, "target_parameters": ["down_proj"]},
        {},
        "not a multiple of the model's 4 experts",
    ),
    "fused_and_per_expert_twice": (
        {**_per_expert(1, 4), **_3d(4 * E, 4 * E, b_rows=2 * I_MOE, in_dim=H)},
        {"target_parameters": ["gate_up_proj"]},
        {},
        "both target experts.gate of layer 0, expert 1",
    ),
    "no_tensors": ({}, {}, {}, "has no tensors"),
    "layers_to_transform": (
        _q(layer=0),
        {"layers_to_transform": [1]},
        {},
        "outside layers_to_transform=[1]",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_adapter_and_problem(case, tmp_path):
    tensors, config, kwargs, words = REFUSALS[case]
    path = write_adapter(tmp_path / "bad-adapter", tensors, **config)
    with pytest.raises(AdapterValidationError) as err:
        load_adapter_plan(path, moe_sites(), "mixtral", **kwargs)
    assert "'bad-adapter'" in str(err.value) and words in str(err.value), str(err.value)


def test_site_missing_in_a_layer_refused(tmp_path):
    """Qwen2/3-MoE mlp_only_layers: dense MLP sites exist only in some layers."""
    sites = [*moe_sites(), LoraSiteSpec("gate_proj", LAYERS, 1, H, I_DENSE, layers=(1,))]
    key = f"{PREFIX}.{{}}.mlp.gate_proj"
    gen = torch.Generator().manual_seed(5)
    ok = write_adapter(tmp_path / "ok", pair(key.format(1), 4, H, I_DENSE, gen))
    assert load_adapter_plan(ok, sites, "qwen3_moe").ranks["gate_proj"] == [0, 4]
    bad = write_adapter(tmp_path / "bad", pair(key.format(0), 4, H, I_DENSE, gen))
    with pytest.raises(
        AdapterValidationError, match=r"'gate_proj' in layer 0, .* only in layers \[1\]"
    ):
        load_adapter_plan(bad, sites, "qwen3_moe")


def test_gpt_oss_bias_parameter_refused(tmp_path):
    path = write_adapter(
        tmp_path / "b",
        _3d(4 * E, 4 * E, b_rows=2 * I_MOE, in_dim=E),
        target_parameters=["gate_up_proj_bias"],
    )
    with pytest.raises(AdapterValidationError, match="gate_up_proj_bias .* is not supported"):
        load_adapter_plan(path, moe_sites(), "gpt_oss")


def test_nan_refused_when_loading_weights(tmp_path):
    tensors = _q()
    tensors[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"][3, 1] = float("nan")
    plan = load_adapter_plan(write_adapter(tmp_path / "nan", tensors), moe_sites(), "mixtral")
    with pytest.raises(AdapterValidationError, match="q_proj.lora_B.weight' contains NaN"):
        load_dense(plan)


def test_directory_problems(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterValidationError, match=r"adapter_model.bin \(pickle\)"):
        load_adapter_plan(tmp_path / "bin", moe_sites(), "mixtral")
    (tmp_path / "noconf").mkdir()
    with pytest.raises(AdapterValidationError, match="missing .*adapter_config.json"):
        load_adapter_plan(tmp_path / "noconf", moe_sites(), "mixtral")
    path = write_adapter(tmp_path / "cut", _q())
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[:-10])
    with pytest.raises(AdapterValidationError, match="truncated or corrupt"):
        load_adapter_plan(path, moe_sites(), "mixtral")
    (path / "adapter_model.safetensors").write_bytes(data[:20])
    with pytest.raises(AdapterValidationError, match="truncated header"):
        load_adapter_plan(path, moe_sites(), "mixtral")


def test_registration_reads_header_only(tmp_path, monkeypatch):
    """Registration must not touch weights: poison safetensors' loaders and plan anyway."""
    import safetensors

    path = write_adapter(tmp_path / "h", _q())

    def poisoned(*args, **kwargs):
        raise AssertionError("registration loaded weights")

    monkeypatch.setattr(safetensors, "safe_open", poisoned)
    monkeypatch.setattr("moelora.lora.dense.safe_open", poisoned)
    plan = load_adapter_plan(path, moe_sites(), "mixtral")
    assert plan.ranks["q_proj"] == [4, 0] and plan.tensors
    header = plan.tensors[f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"]
    assert header.dtype == "F32" and header.shape == (4, H)


def test_accepts_model_side_site_objects(tmp_path):
    """Any object with the LoraSiteSpec fields works as a site."""
    from types import SimpleNamespace

    sites = [
        SimpleNamespace(name="q_proj", num_layers=2, num_experts=1, in_dim=H, out_dim=H, layers=())
    ]
    plan = load_adapter_plan(write_adapter(tmp_path / "d", _q(layer=1)), sites, "llama")
    a, b = load_dense(plan)["q_proj"][1]
    saved = _q(layer=1)
    torch.testing.assert_close(a[0], saved[f"{PREFIX}.1.self_attn.q_proj.lora_A.weight"])
    torch.testing.assert_close(b[0], 2.0 * saved[f"{PREFIX}.1.self_attn.q_proj.lora_B.weight"])
