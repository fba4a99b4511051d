"""The end-to-end benchmarks run and report what BENCHMARKS.md asks (tiny synthetic model, CPU):
`moelora bench offline` (with vs without adapters, TP via gloo) and `moelora bench scale`; the
GPU-only `moelora bench attention` refuses a CPU machine with a clear message."""

from __future__ import annotations

import json

import pytest
from moelora.cli import main


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bench_offline_reports_every_run(tmp_path):
    out = tmp_path / "offline.jsonl"
    assert main(["bench", "offline", "--device", "cpu", "--num-prompts", "6", "--input-len", "8",
                 "--output-len", "4", "--num-adapters", "3", "--max-loras", "2", "--repeats", "3",
                 "--adapter-dir", str(tmp_path / "adapters"), "--out", str(out)]) == 0
    record = _records(out)[-1]
    for run in ("with_adapters", "no_adapters", "with_adapters_warm"):
        assert record[run]["failed"] == 0 and record[run]["output_tokens_per_s"] > 0
    assert record["adapter_loads"] >= 1 and record["tensor_parallel_size"] == 1
    assert record["throughput_ratio_warm"] > 0 and record["warm_adapter_loads"] >= 0
    # the rounds of the no-adapter and warm runs, and their medians
    assert record["repeats"] == 3
    for run in ("no_adapters", "with_adapters_warm"):
        rounds = sorted(r["tpot_p50_ms"] for r in record[run + "_rounds"])
        assert len(rounds) == 3 and record[run]["tpot_p50_ms"] == rounds[1]


def test_bench_offline_refuses_zero_repeats(tmp_path):
    with pytest.raises(SystemExit, match="--repeats must be at least 1"):
        main(["bench", "offline", "--device", "cpu", "--num-prompts", "2", "--input-len", "4",
              "--output-len", "2", "--num-adapters", "1", "--max-loras", "1", "--repeats", "0",
              "--adapter-dir", str(tmp_path / "adapters")])


def test_bench_scale_runs_every_count_with_few_slots(tmp_path, capsys):
    out = tmp_path / "scale.jsonl"
    assert main(["bench", "scale", "--device", "cpu", "--num-prompts", "12", "--input-len", "8",
                 "--output-len", "4", "--adapter-counts", "2", "12", "--max-loras", "2",
                 "--max-cpu-loras", "4", "--adapter-dir", str(tmp_path / "adapters"),
                 "--out", str(out)]) == 0
    record = _records(out)[-1]
    assert [r["num_adapters"] for r in record["by_count"]] == [2, 12]
    more = record["by_count"][1]
    assert more["failed"] == 0
    assert more["device_loads"] >= more["distinct_adapters_used"] > 2  # more than the 2 slots
    assert more["device_evictions"] > 0
    assert record["by_count"][0]["relative_to_fewest"] == 1.0
    assert "vs fewest" in capsys.readouterr().out


def test_bench_attention_needs_a_gpu_and_says_so(monkeypatch):
    from moelora.bench import attention

    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["bench", "attention", "--context-lens", "64", "--batches", "1"])
