"""A benchmark model that cannot fit is refused before it is built, with the numbers and the
flags that would make it fit (moelora.bench.memory_check); the README's mixtral example in
float32 (~45 GB) is the case in point."""

from __future__ import annotations

import pytest
import torch
from moelora.bench import memory_check
from moelora.bench.memory_check import lora_sites_of, model_config_of, plan_memory, refusal
from moelora.cli import main

GB = 1e9


def test_plan_counts_weights_and_refuses_with_the_numbers():
    plan = plan_memory("synthetic:mixtral-8x7b", 8, torch.float32, torch.device("cpu"),
                       available=(16 * GB, "host memory"))
    assert not plan.fits
    assert plan.weight_bytes == pytest.approx(47.5e9, rel=0.01)  # "~45 GB" of the README's run
    message = refusal(plan)
    assert "synthetic:mixtral-8x7b with 8 layers in float32 needs about 48.0 GB" in message
    assert "47.5 GB of weights" in message and "host memory has 16.0 GB available" in message
    assert "--num-layers 2 or fewer" in message and "--dtype bfloat16 (about 24.3 GB)" in message
    fits = plan_memory("synthetic:mixtral-8x7b", 2, torch.bfloat16, torch.device("cpu"),
                       available=(16 * GB, "host memory"))
    assert fits.fits


def test_extra_bytes_count_against_the_budget():
    small = plan_memory("synthetic:tiny-moe", None, torch.float32, torch.device("cpu"),
                        available=(1 * GB, "host memory"))
    assert small.fits
    crowded = plan_memory("synthetic:tiny-moe", None, torch.float32, torch.device("cpu"),
                          extra_bytes=1 * GB, available=(1 * GB, "host memory"))
    assert not crowded.fits
    assert "--num-layers 3 or fewer" in refusal(crowded) or "--dtype bfloat16" in refusal(crowded)


def test_bench_offline_refuses_a_model_that_cannot_fit(monkeypatch, tmp_path):
    monkeypatch.setattr(memory_check, "host_available_bytes", lambda: 16 * GB)
    with pytest.raises(SystemExit) as refused:
        main(["bench", "offline", "--model", "synthetic:mixtral-8x7b", "--num-layers", "8",
              "--dtype", "float32", "--device", "cpu", "--adapter-dir", str(tmp_path)])
    message = str(refused.value)
    assert "needs about" in message and "16.0 GB available" in message
    assert "--num-layers" in message and "--dtype bfloat16" in message
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_bench_scale_and_latency_refuse_too(monkeypatch, tmp_path):
    monkeypatch.setattr(memory_check, "host_available_bytes", lambda: 8 * GB)
    with pytest.raises(SystemExit, match="needs about"):
        main(["bench", "scale", "--model", "synthetic:qwen3-30b-a3b", "--num-layers", "48",
              "--device", "cpu", "--adapter-counts", "1", "--adapter-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs about"):
        main(["bench", "latency", "--model", "synthetic:qwen3-30b-a3b", "--device", "cpu",
              "--out", "-", "--adapter-dir", str(tmp_path)])


def test_latency_builds_the_first_layer_count_that_fits(monkeypatch):
    from moelora.bench import latency

    two = plan_memory("synthetic:tiny-moe", 2, torch.float32, torch.device("cpu"),
                      available=(0, ""))
    room = two.need_bytes + 4e6  # two layers and their adapters fit, four do not
    monkeypatch.setattr(memory_check, "host_available_bytes", lambda: room)
    args = latency.add_cli_args(__import__("argparse").ArgumentParser()).parse_args(
        ["--device", "cpu", "--num-layers", "4,2", "--num-adapters", "0", "--num-seqs", "1"])
    latency._validate(args)
    notes = []
    assert latency._pick_layers(args, notes) == 2
    assert "4 layers do not fit" in notes[0] and "built 2" in notes[0]


def test_sites_and_config_without_building_the_model():
    config = model_config_of("synthetic:gpt-oss-20b", 3)
    assert config.num_layers == 3 and config.num_experts == 32
    sites = {s.name: s for s in lora_sites_of("synthetic:gpt-oss-20b", 3)}
    assert sites["experts.gate"].num_experts == 32 and sites["q_proj"].out_dim == 64 * 64
