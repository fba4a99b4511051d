"""`moelora bench scale`: the GPU run's arguments parse, --results-dir writes the record, a
markdown table with the command that made it and the plot (CPU, a few tiny adapters), and a
layer count whose adapters would not fit the disk is refused before anything is written."""

from __future__ import annotations

import argparse
import json
import math
import shlex
from collections import namedtuple

import pytest
from moelora.bench import scale
from moelora.bench.scale_report import card_label
from moelora.cli import main

GPU_ARGS = ("--model synthetic:gpt-oss-20b --num-layers 4 --weights mxfp4 "
            "--adapter-counts 8 64 512 --max-loras 64 --max-cpu-loras 128 "
            "--popularity uniform zipf --request-rate inf auto --num-prompts 512 --input-len 32 "
            "--output-len 32 --results-dir bench/results")


def parse(argv: list[str]):
    return scale.add_cli_args(argparse.ArgumentParser()).parse_args(argv)


def test_the_gpu_runs_arguments_parse():
    args = parse(shlex.split(GPU_ARGS))
    assert args.adapter_counts == [8, 64, 512] and args.num_layers == 4
    assert (args.max_loras, args.max_cpu_loras) == (64, 128)
    assert args.popularity == ["uniform", "zipf"] and args.request_rate == [math.inf, "auto"]
    assert (args.num_prompts, args.input_len, args.output_len) == (512, 32, 32)
    assert args.weights == "mxfp4" and args.results_dir == "bench/results"


@pytest.mark.parametrize("name, label", [("NVIDIA H100 80GB HBM3", "h100"),
                                         ("NVIDIA H200", "h200"), ("cpu", "cpu"),
                                         ("NVIDIA A100-SXM4-80GB", "a100"),
                                         ("Some Card", "some-card")])
def test_card_label(name, label):
    assert card_label(name) == label


def test_results_dir_gets_the_record_the_table_and_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    argv = ["--device", "cpu", "--num-layers", "1", "--num-prompts", "6", "--input-len", "4",
            "--output-len", "3", "--adapter-counts", "2", "3", "--max-loras", "2",
            "--max-cpu-loras", "2", "--popularity", "uniform", "--request-rate", "inf",
            "--adapter-dir", str(tmp_path / "adapters"), "--results-dir", str(results)]
    assert main(["bench", "scale", *argv]) == 0
    record = json.loads((results / "cpu-scale.jsonl").read_text().splitlines()[-1])
    assert record["num_layers"] == 1 and record["weights"] == "bf16"
    assert [p["num_adapters"] for p in record["points"]] == [2, 3]
    table = (results / "cpu-scale.md").read_text()
    command = next(line.strip("`") for line in table.splitlines() if line.startswith("`"))
    assert command.startswith("moelora bench scale ")
    # The command gives the same arguments back.
    assert vars(parse(shlex.split(command)[3:])) == vars(parse(argv))
    assert "| popularity |" in table and "- uniform, rate inf: 3 adapters" in table
    assert (results / "cpu-scale.png").stat().st_size > 1000
    assert "results: " in capsys.readouterr().out


def test_adapters_that_would_not_fit_the_disk_are_refused(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(scale.shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    with pytest.raises(SystemExit, match=r"512 adapters of 4 layers take 31.6 GB, more than"):
        main(["bench", "scale", *shlex.split(GPU_ARGS), "--device", "cpu", "--dtype", "bfloat16",
              "--adapter-dir", str(tmp_path / "adapters")])
    assert not any((tmp_path / "adapters").iterdir())


def test_warm_host_reads_the_adapters_before_the_clock(tmp_path, capsys):
    """--warm-host: every adapter of a point is in host memory before its requests run, so the
    point itself reads nothing from disk (host_loads 0) and only copies to the device."""
    argv = ["--device", "cpu", "--num-layers", "1", "--num-prompts", "6", "--input-len", "4",
            "--output-len", "3", "--adapter-counts", "3", "--max-loras", "2",
            "--max-cpu-loras", "3", "--popularity", "uniform", "--request-rate", "inf",
            "--warm-host", "--adapter-dir", str(tmp_path / "adapters"),
            "--out", str(tmp_path / "scale.jsonl")]
    assert main(["bench", "scale", *argv]) == 0
    record = json.loads((tmp_path / "scale.jsonl").read_text().splitlines()[-1])
    assert record["warm_host"] is True
    (point,) = record["points"]
    assert point["host_warm"] == 3 and point["host_loads"] == 0 and point["device_loads"] >= 2
    # 6 requests of 3 tokens each: at least 3 steps, never more than 6 sequences running
    assert point["steps"] >= 3 and 0 < point["mean_running"] <= 6
    assert 0 <= point["steps_short_for_adapters"] <= point["steps"]
    assert 0 <= point["steps_empty"] <= point["steps"]
    assert 0 < point["step_ms_median"] <= point["step_ms_max"]
    assert point["step_ms_mean"] <= point["step_ms_max"]
