"""Benchmark records are strict JSON (no Infinity or NaN, which strict parsers reject) and tables
read plainly (moelora.bench.records)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from moelora.bench.records import append_record, dumps, format_table, median, percentile, ratio


def strict_loads(text: str):
    """json.loads that refuses the Infinity / NaN extensions Python writes by default."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_records_are_strict_json(tmp_path):
    record = {"rate": math.inf, "low": -math.inf, "missing": math.nan,
              "nested": [{"x": float("nan")}, (1.5, np.float64(2.0))], "ok": 3}
    text = dumps(record)
    assert strict_loads(text) == {"rate": "inf", "low": "-inf", "missing": None,
                                  "nested": [{"x": None}, [1.5, 2.0]], "ok": 3}
    path = tmp_path / "sub" / "out.jsonl"
    append_record(record, str(path))
    append_record({"ok": 4}, str(path))
    lines = path.read_text().splitlines()
    assert [strict_loads(line)["ok"] for line in lines] == [3, 4]
    append_record(record, None)  # no file: nothing written, no error
    with pytest.raises(ValueError):
        json.dumps({"x": math.nan}, allow_nan=False)  # what dumps guards against


def test_statistics_of_nothing_are_missing_not_errors():
    assert math.isnan(percentile([], 0.5)) and math.isnan(median([]))
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([1.0, 2.0], 0.99) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5 and median([1.0, None, math.nan]) == 1.0
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None and ratio(math.nan, 1.0) is None


def test_table_is_aligned_and_shows_missing_values():
    table = format_table([("name", "name"), ("value", "value ms")],
                         [{"name": "a", "value": 1.23456}, {"name": "longer", "value": None},
                          {"name": "c", "value": math.inf}])
    lines = table.splitlines()
    assert lines[0] == "  name  value ms"
    assert lines[1] == "------  --------"
    assert lines[2] == "     a      1.23"
    assert lines[3] == "longer         -"
    assert lines[4] == "     c       inf"


@pytest.mark.parametrize("command", ["latency", "offline", "scale"])
def test_plot_without_matplotlib_names_the_pip_line_before_running(command, monkeypatch):
    import sys

    from moelora.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="--plot needs matplotlib: pip install matplotlib"):
        main(["bench", command, "--device", "cpu", "--plot"])
