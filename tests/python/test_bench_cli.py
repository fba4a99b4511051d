"""The end-to-end benchmarks run and report what BENCHMARKS.md asks (tiny synthetic model, CPU):
`moelora bench offline` (with vs without adapters, a table and per-adapter results beside strict
JSON) and `moelora bench scale` (popularity x arrivals, cold points, ratios to the fewest
adapters); the GPU-only `moelora bench attention` refuses a CPU machine with a clear message."""

from __future__ import annotations

import json

import pytest
import torch
from moelora.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: a shared 2-core CI machine runs these steps 50x slower with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _refuse(name):
    raise ValueError(f"not JSON: {name}")


def _records(path):
    return [json.loads(line, parse_constant=_refuse) for line in path.read_text().splitlines()]


def test_bench_offline_reports_every_run(tmp_path, capsys):
    out = tmp_path / "offline.jsonl"
    argv = ["bench", "offline", "--device", "cpu", "--num-prompts", "6", "--input-len", "8",
            "--output-len", "4", "--num-adapters", "3", "--max-loras", "2", "--repeats", "3",
            "--adapter-dir", str(tmp_path / "adapters"), "--out", str(out), "--step-trace"]
    pytest.importorskip("matplotlib")
    argv += ["--plot", str(tmp_path / "adapters.png")]
    assert main(argv) == 0
    record = _records(out)[-1]
    for run in ("with_adapters", "no_adapters", "with_adapters_warm"):
        assert record[run]["failed"] == 0 and record[run]["output_tokens_per_s"] > 0
    assert record["adapter_loads"] >= 1 and record["tensor_parallel_size"] == 1
    assert record["throughput_ratio_warm"] > 0 and record["warm_adapter_loads"] >= 0
    # the cold run's bound: the warm run, or a plain read of the files it used
    bound = record["cold_bound"]
    assert bound["plain_read_s"] > 0 and 0 < bound["ratio_to_bound"]
    assert bound["bound_s"] == max(record["with_adapters_warm"]["duration_s"],
                                   bound["plain_read_s"])
    # when each adapter of the cold run became ready on the device, in order
    timeline = record["with_adapters"]["adapter_timeline"]
    used = {a for a in record["per_adapter_cold"]}
    assert set(timeline["ready_s"]) == used and timeline["adapters_ready"] == len(used)
    assert 0 < timeline["first_ready_s"] <= timeline["median_ready_s"] <= timeline["last_ready_s"]
    assert timeline["steps_to_last_ready"] >= 1
    assert timeline["host_load_ms_mean"] > 0 and timeline["device_load_ms_mean"] > 0
    # registering the cold run's adapters is part of queueing its requests
    assert 0 < timeline["registration_s"] <= record["with_adapters"]["add_request_s"]
    assert timeline["reserve_blocks_at_start"] >= 0
    # each step's wall time and running sequences: 6 requests never fill half of the default
    # 64-sequence batch, so every step counts as run by under half of it
    for run in ("with_adapters", "with_adapters_warm"):
        profile = record[run]["step_profile"]
        assert profile["steps"] >= 4 and profile["seconds"] > 0  # 4 tokens a request
        assert profile["steps_below_half_batch"] == profile["steps"]
        assert profile["seconds_below_half_batch"] == pytest.approx(profile["seconds"])
        assert 0 <= profile["mean_running"] <= 6
    # --step-trace: every step of the cold run, [start, seconds, running, waiting, adapters on
    # the device, allocator calls], starts from 0 and in order
    trace = record["with_adapters"]["step_profile"]["trace"]
    assert len(trace) == record["with_adapters"]["step_profile"]["steps"]
    assert trace[0][0] == 0 and [row[0] for row in trace] == sorted(row[0] for row in trace)
    assert all(len(row) == 6 and row[2] + row[3] <= 6 for row in trace)
    assert "trace" not in record["with_adapters_warm"]["step_profile"]
    # the rounds of the no-adapter and warm runs, and their medians
    assert record["repeats"] == 3
    for run in ("no_adapters", "with_adapters_warm"):
        rounds = sorted(r["tpot_p50_ms"] for r in record[run + "_rounds"])
        assert len(rounds) == 3 and record[run]["tpot_p50_ms"] == rounds[1]
    # per adapter: every request of the warm run is counted once
    per_adapter = record["per_adapter_warm"]
    assert sum(a["requests"] for a in per_adapter.values()) == 6
    assert set(per_adapter) <= {"a0", "a1", "a2"}
    assert all(a["failed"] == 0 and a["output_tokens"] == 4 * a["requests"]
               for a in per_adapter.values())
    printed = capsys.readouterr().out
    for text in ("no adapters", "adapters, cold", "adapters, warm", "per adapter", "TPOT p50",
                 "of the best", "adapters ready on the device",
                 "steps run by under half the batch"):
        assert text in printed, text
    assert (tmp_path / "adapters.png").stat().st_size > 1000


def test_bench_offline_refuses_zero_repeats(tmp_path):
    with pytest.raises(SystemExit, match="--repeats must be at least 1"):
        main(["bench", "offline", "--device", "cpu", "--num-prompts", "2", "--input-len", "4",
              "--output-len", "2", "--num-adapters", "1", "--max-loras", "1", "--repeats", "0",
              "--adapter-dir", str(tmp_path / "adapters")])


def test_bench_scale_runs_every_point_with_few_slots(tmp_path, capsys):
    out = tmp_path / "scale.jsonl"
    argv = ["bench", "scale", "--device", "cpu", "--num-prompts", "12", "--input-len", "8",
            "--output-len", "4", "--adapter-counts", "2", "12", "--max-loras", "2",
            "--max-cpu-loras", "4", "--popularity", "uniform", "zipf",
            "--request-rate", "inf", "auto", "--adapter-dir", str(tmp_path / "adapters"),
            "--out", str(out)]
    pytest.importorskip("matplotlib")
    argv += ["--plot", str(tmp_path / "scale.png")]
    assert main(argv) == 0
    record = _records(out)[-1]
    points = record["points"]
    auto_rate = record["no_adapters"][1]["request_rate"]
    assert [p["request_rate"] for p in record["no_adapters"]] == ["inf", auto_rate]
    assert 0 < auto_rate < record["no_adapters"][0]["requests_per_s"]
    assert [(p["popularity"], p["request_rate"], p["num_adapters"]) for p in points] == [
        (pop, rate, count) for pop in ("uniform", "zipf") for rate in ("inf", auto_rate)
        for count in (2, 12)]
    for fewest, more in zip(points[::2], points[1::2]):
        assert fewest["relative_to_fewest"] == 1.0
        assert more["relative_to_fewest"] == pytest.approx(
            more["output_tokens_per_s"] / fewest["output_tokens_per_s"])
        assert more["failed"] == 0
        # every point starts cold: each adapter it uses is loaded at least once
        assert more["device_loads"] >= more["distinct_adapters_used"]
    uniform_all_at_once = points[1]
    assert uniform_all_at_once["distinct_adapters_used"] > 2  # more than the 2 slots
    assert uniform_all_at_once["device_evictions"] > 0
    printed = capsys.readouterr().out
    assert "vs fewest" in printed and "vs none" in printed
    assert (tmp_path / "scale.png").stat().st_size > 1000


def test_bench_attention_needs_a_gpu_and_says_so(monkeypatch):
    from moelora.bench import attention

    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["bench", "attention", "--context-lens", "64", "--batches", "1"])
