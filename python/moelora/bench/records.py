"""What every end-to-end benchmark shares when it reports: strict JSON records (one line each),
percentiles, the fields naming the machine, and plain-text tables.

JSON has no Infinity or NaN: a record is sanitised first (NaN -> null, +-inf -> "inf"/"-inf",
the spelling `vllm bench serve` uses for an unlimited request rate) and then written with
allow_nan=False, so a value that slipped through fails loudly instead of writing a file that
strict parsers reject.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence


def sanitize(value):
    """`value` with every float NaN replaced by None and every infinity by "inf" / "-inf",
    through dicts, lists and tuples (tuples become lists, as json would write them)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return sanitize(value.item())
    return value


def dumps(record, indent: int | None = None) -> str:
    """Strict JSON text of `record` (sanitised; never Infinity or NaN)."""
    return json.dumps(sanitize(record), allow_nan=False, indent=indent)


def append_record(record: dict, path: str | None) -> None:
    """Appends `record` as one JSON line to `path` (nothing when path is None)."""
    if not path:
        return
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(dumps(record) + "\n")


def write_json(record: dict, path: str) -> None:
    """Writes `record` as one indented JSON document (replacing the file)."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(dumps(record, indent=1) + "\n")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) by nearest rank; NaN for no values (null once saved)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values (null once saved)."""
    ordered = sorted(v for v in values if v is not None and not math.isnan(v))
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing, NaN or the denominator is 0."""
    if numerator is None or denominator is None:
        return None
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return None
    return numerator / denominator


def device_fields(device) -> dict:
    """The fields a record names its machine with: device, device_name (as torch names it,
    e.g. "NVIDIA H100 80GB HBM3"; "cpu" on the host)."""
    import torch

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu"}


def engine_fields(engine) -> dict:
    """device, device_name and dtype of an engine."""
    return {**device_fields(engine.device), "dtype": str(engine.dtype).removeprefix("torch.")}


def _cell(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict],
                 digits: int = 2) -> str:
    """A right-aligned text table: `columns` are (key in each row, header); floats get
    `digits` decimals; missing values print as "-"."""
    header = [title for _, title in columns]
    body = [[_cell(row.get(key), digits) for key, _ in columns] for row in rows]
    widths = [max(len(text) for text in [title] + [line[i] for line in body])
              for i, title in enumerate(header)]
    lines = ["  ".join(title.rjust(w) for title, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(text.rjust(w) for text, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


MATPLOTLIB_HINT = "pip install matplotlib"


def pyplot():
    """matplotlib.pyplot with a file-only backend; SystemExit naming the pip line without it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib: {MATPLOTLIB_HINT}") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
