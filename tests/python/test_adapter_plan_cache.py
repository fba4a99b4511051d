"""Adapters of one recipe share a plan: the second registers from the plan cache (no parse,
no checks) with its own name and paths, and anything the plan depends on (config, headers,
file sizes, the model's sites or max rank) makes a new one."""

from __future__ import annotations

import json
import os

import pytest
import torch
from moelora.bench.synthetic_adapters import write_random_adapter
from moelora.lora import AdapterValidationError, load_adapter_plan
from moelora.lora import plan as plan_module
from moelora.models.synthetic import build_synthetic


@pytest.fixture(scope="module")
def sites():
    return build_synthetic("tiny-moe", dtype=torch.float32).lora_sites()


@pytest.fixture
def builds(monkeypatch):
    plan_module._PLANS.clear()
    calls = []
    original = plan_module._build_plan
    monkeypatch.setattr(plan_module, "_build_plan",
                        lambda *args: calls.append(args[0]) or original(*args))
    yield calls
    plan_module._PLANS.clear()


def _write(tmp_path, name, sites, seed, rank=4):
    return write_random_adapter(str(tmp_path / name), sites, rank, seed=seed,
                                dtype=torch.float32)


def test_a_second_adapter_of_one_recipe_takes_the_cached_plan(tmp_path, sites, builds):
    first = load_adapter_plan(_write(tmp_path, "a", sites, 1), sites, "mixtral", name="a")
    second_dir = _write(tmp_path, "b", sites, 2)
    second = load_adapter_plan(second_dir, sites, "mixtral", name="b")
    assert builds == ["a"]  # b was not parsed
    assert (second.name, str(second.path)) == ("b", second_dir)
    assert [str(f) for f in second.files] == [os.path.join(second_dir,
                                                            "adapter_model.safetensors")]
    assert second.sources == first.sources and second.ranks == first.ranks
    second.ranks[next(iter(second.ranks))][0] = 99  # a plan's own: the cache is not touched
    third = load_adapter_plan(_write(tmp_path, "c", sites, 3), sites, "mixtral", name="c")
    assert third.ranks == first.ranks and builds == ["a"]
    plan_module._PLANS.clear()
    fresh = load_adapter_plan(second_dir, sites, "mixtral", name="b")
    assert fresh.sources == second.sources and builds == ["a", "b"]


def test_what_the_plan_depends_on_makes_a_new_one(tmp_path, sites, builds):
    base = _write(tmp_path, "a", sites, 1)
    load_adapter_plan(base, sites, "mixtral", name="a")
    other_rank = _write(tmp_path, "r8", sites, 2, rank=8)
    load_adapter_plan(other_rank, sites, "mixtral", name="r8")
    scaled = _write(tmp_path, "alpha", sites, 3)
    config_file = os.path.join(scaled, "adapter_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["lora_alpha"] = 2 * config["lora_alpha"]
    with open(config_file, "w") as f:
        json.dump(config, f)
    plan = load_adapter_plan(scaled, sites, "mixtral", name="alpha")
    load_adapter_plan(base, sites, "mixtral", name="a", max_lora_rank=64)
    assert builds == ["a", "r8", "alpha", "a"]
    baseline = load_adapter_plan(base, sites, "mixtral", name="a")
    b_scales = {s.scale for s in plan.sources if s.is_b}
    assert b_scales == {2 * s.scale for s in baseline.sources if s.is_b}


def test_a_truncated_copy_of_a_cached_recipe_is_refused(tmp_path, sites, builds):
    load_adapter_plan(_write(tmp_path, "a", sites, 1), sites, "mixtral", name="a")
    cut = _write(tmp_path, "cut", sites, 2)
    file = os.path.join(cut, "adapter_model.safetensors")
    os.truncate(file, os.path.getsize(file) - 64)  # same header, fewer bytes
    with pytest.raises(AdapterValidationError, match="'cut'.*truncated"):
        load_adapter_plan(cut, sites, "mixtral", name="cut")
