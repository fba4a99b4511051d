"""Every family against HF transformers: logits of a prompt and batched greedy generation.

Each family: a tiny random HF model saved sharded (hf_tiny.py), loaded by moelora's loader,
then (1) prompt logits within 1e-4 relative of HF's, (2) greedy decoding of 3 prompts of
different lengths, all three in every forward through ReferenceContext (one batched prefill,
then batched decode steps), token-for-token equal to HF generate(do_sample=False).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny
from moelora.models import ReferenceContext, load_model

PROMPTS = ([5, 17, 42, 99, 3, 250, 7, 8, 9, 11, 12],  # 11 tokens: longer than GPT-OSS's window
           [1, 200, 150],
           [77, 66, 55, 44, 33, 22, 11])
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=hf_tiny.FAMILIES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model, _ = hf_tiny.make_tiny(request.param, path)
    model = load_model(path, dtype=torch.float32, device="cpu", progress=False)
    return request.param, path, hf_model, model


def greedy(model, prompts, new_tokens):
    """Batched prefill of all prompts in one forward, then batched one-token decode steps."""
    ctx = ReferenceContext()
    outs = [[] for _ in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    seq_ids = torch.tensor([i for i, p in enumerate(prompts) for _ in p])
    positions = torch.tensor([j for p in prompts for j in range(len(p))])
    lengths = [len(p) for p in prompts]
    for _ in range(new_tokens):
        ctx.begin_step(seq_ids, positions)
        logits = model.compute_logits(model(ids, positions, ctx))
        last = torch.tensor([seq_ids.tolist().index(i) + n - 1 for i, n in
                             enumerate([(seq_ids == i).sum().item() for i in range(len(prompts))])])
        next_ids = logits[last].argmax(-1)
        for i, tok in enumerate(next_ids.tolist()):
            outs[i].append(tok)
        ids = next_ids
        seq_ids = torch.arange(len(prompts))
        positions = torch.tensor(lengths)
        lengths = [n + 1 for n in lengths]
    return outs


@torch.inference_mode()
def test_logits_match_hf(tiny):
    family, _, hf_model, model = tiny
    prompt = torch.tensor(PROMPTS[0])
    ref = hf_model(prompt[None]).logits[0].float()
    ctx = ReferenceContext()
    ctx.begin_step(torch.zeros_like(prompt), torch.arange(len(prompt)))
    ours = model.compute_logits(model(prompt, torch.arange(len(prompt)), ctx))
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                               msg=lambda m: f"{family}: {m}")


@torch.inference_mode()
def test_greedy_generation_matches_hf(tiny):
    family, _, hf_model, model = tiny
    ours = greedy(model, PROMPTS, NEW_TOKENS)
    for prompt, got in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist(), f"{family}: prompt {prompt}"


# ---- errors -----------------------------------------------------------------------------


def test_unknown_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*FooForCausalLM"):
        load_model(tmp_path, dtype=torch.float32)


def _rewrite_checkpoint(src: Path, dst: Path, edit) -> None:
    """Copy a sharded checkpoint into one model.safetensors after `edit(tensors)`."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    edit(tensors)
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, dst / "model.safetensors")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral_src")
    hf_tiny.make_tiny("mixtral", path)
    return path


def test_missing_tensor_names_it(mixtral_dir, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    _rewrite_checkpoint(mixtral_dir, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        load_model(tmp_path / "m", dtype=torch.float32, progress=False)
    _rewrite_checkpoint(mixtral_dir, tmp_path / "n",
                        lambda t: t.pop("model.layers.0.input_layernorm.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.0\.input_layernorm\.weight"):
        load_model(tmp_path / "n", dtype=torch.float32, progress=False)


def test_mismatched_and_unknown_tensors_name_them(mixtral_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_checkpoint(mixtral_dir, tmp_path / "m",
                        lambda t: t.__setitem__(name, torch.zeros(7, 64)))
    with pytest.raises(ValueError, match=rf"{name.replace('.', '.')}.*\(7, 64\).*\(32, 64\)"):
        load_model(tmp_path / "m", dtype=torch.float32, progress=False)
    _rewrite_checkpoint(mixtral_dir, tmp_path / "u",
                        lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(KeyError, match=r"model\.layers\.0\.mystery\.weight"):
        load_model(tmp_path / "u", dtype=torch.float32, progress=False)


def test_fused_expert_layout_loads_like_per_expert(mixtral_dir, tmp_path):
    """HF's in-memory 3D layout (experts.gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    def fuse(t):
        for layer in range(2):
            p = f"model.layers.{layer}.block_sparse_moe"
            gate_up = [torch.cat([t.pop(f"{p}.experts.{e}.w1.weight"),
                                  t.pop(f"{p}.experts.{e}.w3.weight")]) for e in range(4)]
            down = [t.pop(f"{p}.experts.{e}.w2.weight") for e in range(4)]
            q = f"model.layers.{layer}.mlp"
            t[f"{q}.experts.gate_up_proj"] = torch.stack(gate_up)
            t[f"{q}.experts.down_proj"] = torch.stack(down)
            t[f"{q}.gate.weight"] = t.pop(f"{p}.gate.weight")

    _rewrite_checkpoint(mixtral_dir, tmp_path / "f", fuse)
    fused = load_model(tmp_path / "f", dtype=torch.float32, progress=False)
    ref = load_model(mixtral_dir, dtype=torch.float32, progress=False)
    for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), name


# ---- LoRA hooks, sites, synthetic ----------------------------------------------------------


def _random_lora(site_spec, rank, gen):
    a = torch.randn(site_spec.num_experts, rank, site_spec.in_dim, generator=gen) * 0.2
    b = torch.randn(site_spec.num_experts, site_spec.out_dim, rank, generator=gen) * 0.2
    return a, b


@torch.no_grad()
def _merge(model, adapter):
    """Fold an adapter into a copy of the base weights: the model PEFT's merge would give."""
    import copy

    merged = copy.deepcopy(model)
    for site, per_layer in adapter.items():
        for layer, (a, b) in per_layer.items():
            delta = b @ a  # [E, out, in]
            block = merged.model.layers[layer]
            if site.startswith("experts."):
                experts = block.mlp.experts
                inter = experts.inter
                if site == "experts.gate":
                    experts.w13[:, :inter] += delta
                elif site == "experts.up":
                    experts.w13[:, inter:] += delta
                else:
                    experts.w2 += delta
            elif site.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
                getattr(block.self_attn, site).weight += delta[0]
            else:
                owner = block.mlp.shared_expert if site.startswith("shared_expert.") else block.mlp
                getattr(owner, site.rsplit(".", 1)[-1]).weight += delta[0]
    return merged


@torch.inference_mode()
def test_reference_lora_hooks_equal_merged_weights(tmp_path):
    """Three sequences in one batch: adapter 0, base (-1), adapter 1. Each must equal its own
    merged model run alone: dense, shared-expert and expert sites, on MoE and dense layers."""
    hf_tiny.make_tiny("qwen2_moe", tmp_path)
    model = load_model(tmp_path, dtype=torch.float32, progress=False)
    sites = {s.name: s for s in model.lora_sites()}
    assert set(sites) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                          "shared_expert.down_proj", "experts.gate", "experts.up",
                          "experts.down"}
    assert sites["gate_proj"].layers == (1,) and sites["experts.up"].layers == (0, 2)
    assert (sites["experts.down"].num_experts, sites["experts.down"].in_dim) == (8, 32)
    gen = torch.Generator().manual_seed(1)
    adapters = {
        0: {"q_proj": {0: _random_lora(sites["q_proj"], 4, gen)},
            "o_proj": {1: _random_lora(sites["o_proj"], 4, gen)},
            "gate_proj": {1: _random_lora(sites["gate_proj"], 4, gen)},
            "shared_expert.up_proj": {0: _random_lora(sites["shared_expert.up_proj"], 4, gen)},
            "experts.gate": {0: _random_lora(sites["experts.gate"], 4, gen)},
            "experts.up": {2: _random_lora(sites["experts.up"], 4, gen)},
            "experts.down": {0: _random_lora(sites["experts.down"], 4, gen),
                             2: _random_lora(sites["experts.down"], 4, gen)}},
        1: {"v_proj": {2: _random_lora(sites["v_proj"], 2, gen)},
            "experts.down": {2: _random_lora(sites["experts.down"], 8, gen)},
            "shared_expert.down_proj": {2: _random_lora(sites["shared_expert.down_proj"], 2,
                                                        gen)}},
    }
    slots = (0, -1, 1)
    ids = torch.tensor([t for p in PROMPTS for t in p])
    seq_ids = torch.tensor([i for i, p in enumerate(PROMPTS) for _ in p])
    positions = torch.tensor([j for p in PROMPTS for j in range(len(p))])
    ctx = ReferenceContext(adapters)
    ctx.begin_step(seq_ids, positions, torch.tensor([slots[i] for i in seq_ids.tolist()],
                                                    dtype=torch.int32))
    batched = model.compute_logits(model(ids, positions, ctx))
    for i, (prompt, slot) in enumerate(zip(PROMPTS, slots)):
        alone = model if slot < 0 else _merge(model, adapters[slot])
        c = ReferenceContext()
        pos = torch.arange(len(prompt))
        c.begin_step(torch.zeros_like(pos), pos)
        ref = alone.compute_logits(alone(torch.tensor(prompt), pos, c))
        torch.testing.assert_close(batched[seq_ids == i], ref, rtol=1e-4, atol=1e-4)
        if slot >= 0:  # the adapter really changed the output
            assert (ref - model.compute_logits(model(torch.tensor(prompt), pos,
                                                     _fresh(pos)))).abs().max() > 1e-2


def _fresh(pos):
    c = ReferenceContext()
    c.begin_step(torch.zeros_like(pos), pos)
    return c


@torch.inference_mode()
def test_synthetic_preset_builds_real_shapes_with_fewer_layers():
    model = load_model("synthetic:tiny-moe", dtype=torch.bfloat16, num_layers=2)
    assert model.config.num_layers == 2 and len(model.model.layers) == 2
    assert model.model.layers[0].mlp.experts.w13.shape == (8, 256, 256)
    assert model.model.layers[0].mlp.experts.w13.dtype == torch.bfloat16
    std = model.model.layers[1].self_attn.q_proj.weight.float().std().item()
    assert 0.015 < std < 0.025
    pos = torch.arange(5)
    logits = model.compute_logits(model(torch.tensor([1, 2, 3, 4, 5]), pos, _fresh(pos)))
    assert logits.shape == (5, 1024) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        load_model("synthetic:nope")
    with pytest.raises(ValueError, match="num_layers"):
        load_model("synthetic:tiny-moe", num_layers=99)


def test_every_synthetic_preset_config_parses():
    from moelora.models import model_class
    from moelora.models.synthetic import PRESETS, preset_hf_config

    expect = {"gpt-oss-20b": (24, 32, 4, 2880), "qwen3-30b-a3b": (48, 128, 8, 768),
              "mixtral-8x7b": (32, 8, 2, 14336), "olmoe-1b-7b": (16, 64, 8, 1024),
              "tiny-moe": (4, 8, 2, 128), "tiny-gpt-oss": (2, 4, 2, 64)}
    assert set(PRESETS) == set(expect)
    for preset, dims in expect.items():
        hf = preset_hf_config(preset)
        c = model_class(hf["architectures"][0]).config_from_hf(hf)
        assert (c.num_layers, c.num_experts, c.top_k, c.moe_intermediate_size) == dims, preset
    c = model_class("GptOssForCausalLM").config_from_hf(preset_hf_config("gpt-oss-20b", 3))
    assert c.sliding_windows == (128, None, 128) and c.rope_type == "yarn"


def test_reference_context_rejects_positions_that_skip():
    ctx = ReferenceContext()
    q = torch.randn(2, 4, 16)
    kv = torch.randn(2, 2, 16)
    ctx.begin_step(torch.tensor([0, 0]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="do not continue"):
        ctx.attention(0, q, kv, kv, scale=0.25, sliding_window=None, sinks=None)
