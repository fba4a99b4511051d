"""The results folder of `moelora bench scale` (--results-dir): the record appended to
NAME.jsonl, the table and the command that made it in NAME.md, the plot in NAME.png. NAME is
--results-name, by default "<card>-scale" (h100-scale, h200-scale, cpu-scale)."""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex

from moelora.bench.records import append_record


def card_label(device_name: str) -> str:
    """"h100" for "NVIDIA H100 80GB HBM3", "cpu" for the host; the device name, lower-cased
    and dashed, when it names no known card."""
    found = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_name)
    if found:
        return found.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"


def command_of(args, parser: argparse.ArgumentParser, prog: str) -> str:
    """The command line that gives `args` (flags left at their defaults omitted)."""
    parts = prog.split()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0 or (action.nargs == "?" and value == action.const):
            parts.append(flag)
            continue
        values = value if isinstance(value, list) else [value]
        parts += [flag, *(_text(v) for v in values)]
    return shlex.join(parts)


def _text(value) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value)


def markdown_table(columns, rows, digits: int = 2) -> str:
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return "inf" if math.isinf(value) else f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |"
              for row in rows]
    return "\n".join(lines)


def write_results(record: dict, columns, rows, command: str, results_dir: str,
                  name: str | None) -> dict[str, str]:
    """Writes the three files; returns {"record", "table", "plot"}: their paths."""
    from moelora.bench.plots import plot_scale

    name = name or f"{card_label(record['device_name'])}-scale"
    os.makedirs(results_dir, exist_ok=True)
    paths = {kind: os.path.join(results_dir, f"{name}.{ext}")
             for kind, ext in (("record", "jsonl"), ("table", "md"), ("plot", "png"))}
    append_record(record, paths["record"])
    title = (f"# bench scale: {record['model']}, {record['num_layers']} layers, "
             f"{record['device_name']}")
    prefetch = record.get("lora_prefetch_slots", 0)
    slots = (f"{record['max_loras']} device slots"
             + (f" (+ {prefetch} prefetch slots)" if prefetch else ""))
    setting = (f"{slots}, {record['max_cpu_loras']} host copies, "
               f"rank {record['rank']}, {record['dtype']}; {record['num_prompts']} requests of "
               f"{record['input_len']} + {record['output_len']} tokens per point; every point "
               + ("starts with its adapters in host memory and none on the device."
                  if record.get("warm_host") else "starts cold."))
    target = ("Throughput of the most adapters relative to the fewest, at the same popularity "
              "and arrivals (target: >= 0.90):")
    lines = [title, "", f"`{command}`", "", setting, *record.get("notes", []), "",
             markdown_table(columns, rows), "", target, ""]
    for (popularity, rate), (fewest, most, ratio) in _drops(record["points"]).items():
        shown = "-" if ratio is None else f"{ratio:.3f}x"
        lines.append(f"- {popularity}, rate {_text(rate)}: {most} adapters {shown} of {fewest}")
    with open(paths["table"], "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_scale(record, paths["plot"])
    return paths


def _drops(points: list[dict]) -> dict:
    """{(popularity, rate): (fewest count, most count, throughput ratio most / fewest)}."""
    out = {}
    for point in points:
        key = (point["popularity"], point["request_rate"])
        fewest, most, _ = out.get(key, (point["num_adapters"], point["num_adapters"], None))
        if point["num_adapters"] >= most:
            out[key] = (fewest, point["num_adapters"], point.get("relative_to_fewest"))
    return out
