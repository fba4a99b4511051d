"""PNG plots of the end-to-end benchmarks (matplotlib, an optional dependency: without it the
--plot flag stops with the pip line that installs it)."""

from __future__ import annotations

import os

from moelora.bench.records import pyplot


def _save(fig, path: str) -> str:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _value(record: dict, key: str) -> float:
    value = record.get(key)
    return float("nan") if value is None else float(value)


def plot_latency(records: list[dict], path: str) -> str:
    """Left: wall, GPU and roofline ms per decode step by batch size and adapter count; right:
    output tokens/s, each bar labelled with its ratio to no adapters."""
    plt = pyplot()
    seqs = sorted({r["num_seqs"] for r in records})
    counts = sorted({r["num_adapters"] for r in records})
    by_key = {(r["num_seqs"], r["num_adapters"]): r for r in records}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(counts)
    for j, count in enumerate(counts):
        xs = [i + j * width for i in range(len(seqs))]
        rows = [by_key.get((s, count), {}) for s in seqs]
        left.bar(xs, [_value(r, "step_wall_ms") for r in rows], width,
                 label=f"{count} adapters: wall")
        left.scatter(xs, [_value(r, "step_gpu_ms") for r in rows], marker="o", color="black",
                     zorder=3, label="GPU" if j == 0 else None)
        left.scatter(xs, [_value(r, "roofline_ms") for r in rows], marker="_", s=400,
                     color="red", zorder=3, label="roofline" if j == 0 else None)
        bars = right.bar(xs, [_value(r, "output_tokens_per_s") for r in rows], width,
                         label=f"{count} adapters")
        for bar, row in zip(bars, rows):
            if row.get("ratio_to_no_adapters") is not None and count:
                right.annotate(f"{row['ratio_to_no_adapters']:.2f}x",
                               (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                               ha="center", va="bottom", fontsize=8)
    for axis in (left, right):
        axis.set_xticks([i + width * (len(counts) - 1) / 2 for i in range(len(seqs))],
                        [f"{s} seqs" for s in seqs])
        axis.legend(fontsize=8)
    left.set_ylabel("ms per decode step")
    left.set_title("Decode step: wall, GPU, roofline")
    right.set_ylabel("output tokens / s")
    right.set_title("Throughput (ratio to no adapters)")
    first = records[0]
    fig.suptitle(f"{first['model']}, {first['num_layers']} layers, {first['weights']} experts, "
                 f"{first['device_name']}")
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_per_adapter(per_adapter: dict[str, dict], path: str, title: str,
                     limit: int = 40) -> str:
    """Requests, output tokens/s and TTFT p50 of each adapter (the `limit` busiest)."""
    plt = pyplot()
    names = sorted(per_adapter, key=lambda n: -per_adapter[n]["requests"])[:limit]
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.35 * len(names) + 2), 8), sharex=True)
    for axis, key, label in zip(axes, ("requests", "output_tokens_per_s", "ttft_p50_ms"),
                                ("requests", "output tokens / s", "TTFT p50 (ms)")):
        axis.bar(range(len(names)), [_value(per_adapter[n], key) for n in names])
        axis.set_ylabel(label)
    axes[-1].set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    fig.suptitle(title)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_scale(record: dict, path: str) -> str:
    """Output tokens/s and TTFT p50 against the adapter count, one line per (popularity,
    arrivals) setting, with the no-adapter level dashed."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    settings = {}
    for point in record["points"]:
        settings.setdefault((point["popularity"], point["request_rate"]), []).append(point)
    for (popularity, rate), points in sorted(settings.items(), key=str):
        points = sorted(points, key=lambda p: p["num_adapters"])
        xs = [p["num_adapters"] for p in points]
        label = f"{popularity}, rate {rate}"
        left.plot(xs, [_value(p, "output_tokens_per_s") for p in points], marker="o",
                  label=label)
        right.plot(xs, [_value(p, "ttft_p50_ms") for p in points], marker="o", label=label)
    for base in record["no_adapters"]:
        left.axhline(_value(base, "output_tokens_per_s"), linestyle="--", linewidth=0.8,
                     color="gray")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("adapters")
        axis.legend(fontsize=8)
    left.set_ylabel("output tokens / s")
    left.set_title("Throughput (dashed: no adapters)")
    right.set_ylabel("TTFT p50 (ms)")
    right.set_title("Time to first token")
    fig.suptitle(f"{record['model']}, {record['num_layers']} layers, {record['max_loras']} "
                 f"device slots, {record['device_name']}")
    path = _save(fig, path)
    plt.close(fig)
    return path
