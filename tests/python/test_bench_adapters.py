"""`moelora bench adapters` on a handful of tiny adapters (CPU): the plain parallel read and the
engine's load paths read the same files in one run, and the record carries their rates and
ratios as strict JSON."""

from __future__ import annotations

import json
import os

import pytest
from moelora.bench.adapters import drop_page_cache, plain_parallel_read
from moelora.cli import main


def test_plain_parallel_read_reads_every_byte(tmp_path):
    sizes = [0, 1, (64 << 20) + 3, 1000]  # empty, tiny, more than one chunk
    paths = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"f{index}"
        path.write_bytes(os.urandom(size) if size < 4096 else b"\x01" * size)
        paths.append(str(path))
    assert drop_page_cache(paths) is True
    assert plain_parallel_read(paths, threads=3) > 0
    with pytest.raises(OSError):
        plain_parallel_read([str(tmp_path / "missing")], threads=1)


def test_bench_adapters_times_every_path(tmp_path, capsys):
    out = tmp_path / "adapters.jsonl"
    assert main(["bench", "adapters", "--device", "cpu", "--num-adapters", "3",
                 "--threads", "2", "--repeats", "2", "--adapter-dir", str(tmp_path / "a"),
                 "--out", str(out)]) == 0

    def refuse(name):
        raise ValueError(name)

    record = json.loads(out.read_text().splitlines()[-1], parse_constant=refuse)
    files = [tmp_path / "a" / f"a{i}" / "adapter_model.safetensors" for i in range(3)]
    assert record["file_bytes"] == sum(f.stat().st_size for f in files)
    assert record["host_bytes"] > 0 and len(record["rounds"]) == 2
    for key in ("plain_read_gbps", "engine_disk_to_device_gbps", "engine_disk_to_host_gbps",
                "host_to_pool_gbps", "disk_to_device_ratio_to_plain",
                "disk_to_host_ratio_to_plain"):
        assert record[key] > 0, key
    assert record["engine_host_to_device_gbps"] is None  # no GPU: the pool is host memory
    assert record["disk_to_host_ratio_to_plain"] == pytest.approx(
        record["engine_disk_to_host_gbps"] / record["plain_read_gbps"])
    assert record["page_cache"].startswith("dropped")
    printed = capsys.readouterr().out
    assert "plain parallel read" in printed and "engine: disk -> host" in printed


def test_bench_cold_ttft_holds_each_cold_request_to_its_bound(tmp_path, capsys):
    out = tmp_path / "cold.jsonl"
    # host copies in 1 MB blocks: each ~1.1 MB adapter spans two
    assert main(["bench", "cold-ttft", "--device", "cpu", "--num-adapters", "2",
                 "--background-seqs", "2", "--adapter-dir", str(tmp_path / "a"),
                 "--host-block-mb", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["bench"] == "cold_ttft" and record["step_ms"] > 0
    assert record["host_block_bytes"] == 1 << 20
    assert [row["adapter"] for row in record["rows"]] == ["cold0", "cold1"]
    for row in record["rows"]:
        file = tmp_path / "a" / f"a{row['adapter'][-1]}" / "adapter_model.safetensors"
        assert row["file_bytes"] == file.stat().st_size
        assert row["ttft_ms"] > 0 and row["steps_during"] >= 1
        assert row["steps_loading"] == row["steps_during"] - 1  # synchronous CPU steps
        assert row["admitted_step_ms"] > 0
        assert row["next_step_ms"] is None or row["next_step_ms"] > 0
        assert 0 <= row["host_buffer_ms"] <= row["host_load_ms"]
        assert row["bound_ms"] == pytest.approx(1e3 * row["plain_read_s"]
                                                + 2 * record["step_ms"])
        assert row["ratio_to_bound"] == pytest.approx(row["ttft_ms"] / row["bound_ms"])
    assert "TTFT / bound" in capsys.readouterr().out
