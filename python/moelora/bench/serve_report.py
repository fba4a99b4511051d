"""The report of `moelora bench serve`: the summary `vllm bench serve` prints and saves, a line
per adapter, strict JSON results and the plot."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from moelora.bench.records import format_table, pyplot, write_json


@dataclass
class RequestResult:
    model: str
    adapter: str | None
    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0  # seconds from the benchmark's start
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # seconds from the benchmark's start
    text: str = ""


def _stats(values_s: list[float], percentiles: list[float]) -> dict:
    ms = np.array(values_s, dtype=np.float64) * 1000.0 if values_s else np.zeros(1)
    out = {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(ms, p))
    return out


def _timeline(results: list[RequestResult], duration: float) -> dict:
    """Output tokens per second and requests in flight, per time bin."""
    width = 1.0 if duration >= 10 else max(duration / 10.0, 0.05)
    bins = max(1, math.ceil(duration / width))
    tokens = np.zeros(bins)
    for r in results:
        if not r.success or not r.token_times:
            continue
        per_chunk = r.output_tokens / len(r.token_times)
        for t in r.token_times:
            tokens[min(bins - 1, int(t / width))] += per_chunk
    in_flight = np.zeros(bins)
    for r in results:
        if r.success:
            first, last = int(r.start / width), int((r.start + r.latency) / width)
            in_flight[min(first, bins - 1):min(last, bins - 1) + 1] += 1
    return {"bin_seconds": width, "output_tok_per_s": list(tokens / width),
            "requests_in_flight": list(in_flight)}


def summarize(results: list[RequestResult], duration: float, args, model: str,
              base_url: str) -> dict:
    ok = [r for r in results if r.success]
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    metrics = {"ttft": _stats([r.ttft for r in ok], percentiles),
               "tpot": _stats(tpots, percentiles),
               "itl": _stats([x for r in ok for x in r.itl], percentiles),
               "e2el": _stats([r.latency for r in ok], percentiles)}
    timeline = _timeline(results, duration)
    events = sorted([(r.start, 1) for r in ok] + [(r.start + r.latency, -1) for r in ok])
    peak_concurrency = current = 0
    for _, delta in events:
        current += delta
        peak_concurrency = max(peak_concurrency, current)
    per_adapter = {}
    for name in sorted({r.adapter or "(base)" for r in results}):
        mine = [r for r in ok if (r.adapter or "(base)") == name]
        per_adapter[name] = {
            "requests": sum(1 for r in results if (r.adapter or "(base)") == name),
            "completed": len(mine),
            "output_tokens": sum(r.output_tokens for r in mine),
            "output_throughput": sum(r.output_tokens for r in mine) / duration,
            "mean_ttft_ms": 1000 * float(np.mean([r.ttft for r in mine])) if mine else None,
            "median_ttft_ms": 1000 * float(np.median([r.ttft for r in mine])) if mine else None,
            "mean_e2el_ms": 1000 * float(np.mean([r.latency for r in mine])) if mine else None}
    summary = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai",
        "base_url": base_url, "endpoint": args.endpoint, "model_id": model,
        "num_prompts": args.num_prompts,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "lora_modules": [s.partition("=")[0] for s in args.lora_modules],
        "lora_popularity": args.lora_popularity, "duration": duration,
        "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "peak_output_throughput": max(timeline["output_tok_per_s"], default=0.0),
        "peak_concurrent_requests": peak_concurrency,
        "per_adapter": per_adapter, "timeline": timeline,
        "input_lens": [r.prompt_tokens for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
        "errors": [r.error for r in results],
    }
    for name, stats in metrics.items():
        for key, value in stats.items():
            summary[f"{key}_{name}_ms"] = value
    summary["_percentiles"] = percentiles
    summary["_selected"] = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    return summary


_TITLES = {"ttft": ("Time to First Token", "TTFT"),
           "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
           "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}


_ADAPTER_COLUMNS = [("adapter", "adapter"), ("requests", "requests"), ("completed", "completed"),
                    ("output_throughput", "out tok/s"), ("mean_ttft_ms", "mean TTFT ms"),
                    ("median_ttft_ms", "median TTFT ms"), ("mean_e2el_ms", "mean E2EL ms")]


def print_report(s: dict) -> None:
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    print("{:<40} {:<10}".format("Successful requests:", s["completed"]))
    print("{:<40} {:<10}".format("Failed requests:", s["failed"]))
    if s["max_concurrency"] is not None:
        print("{:<40} {:<10}".format("Maximum request concurrency:", s["max_concurrency"]))
    print("{:<40} {:<10.2f}".format("Benchmark duration (s):", s["duration"]))
    print("{:<40} {:<10}".format("Total input tokens:", s["total_input_tokens"]))
    print("{:<40} {:<10}".format("Total generated tokens:", s["total_output_tokens"]))
    print("{:<40} {:<10.2f}".format("Request throughput (req/s):", s["request_throughput"]))
    print("{:<40} {:<10.2f}".format("Output token throughput (tok/s):", s["output_throughput"]))
    print("{:<40} {:<10.2f}".format("Peak output token throughput (tok/s):",
                                    s["peak_output_throughput"]))
    print("{:<40} {:<10.2f}".format("Peak concurrent requests:", s["peak_concurrent_requests"]))
    print("{:<40} {:<10.2f}".format("Total Token throughput (tok/s):",
                                    s["total_token_throughput"]))
    for metric in s["_selected"]:
        if metric not in _TITLES:
            continue
        title, short = _TITLES[metric]
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        print("{:<40} {:<10.2f}".format(f"Mean {short} (ms):", s[f"mean_{metric}_ms"]))
        print("{:<40} {:<10.2f}".format(f"Median {short} (ms):", s[f"median_{metric}_ms"]))
        for p in s["_percentiles"]:
            print("{:<40} {:<10.2f}".format(f"P{p:g} {short} (ms):", s[f"p{p:g}_{metric}_ms"]))
    print("=" * 50)
    if "prompt_sizing" in s:
        print(f"prompts sized by: {s['prompt_sizing']}")
    if len(s["per_adapter"]) > 1 or s["lora_modules"]:
        print(format_table(_ADAPTER_COLUMNS, [{"adapter": name, **values} for name, values in
                                              s["per_adapter"].items()]))
    failures = [e for e in s["errors"] if e]
    if failures:
        print(f"first error: {failures[0]}")


def save_result(s: dict, args) -> str:
    rate = s["request_rate"]
    name = args.result_filename or (f"moelora-{rate}qps-{s['model_id'].replace('/', '_')}-"
                                    f"{s['date']}.json")
    path = os.path.join(args.result_dir, name) if args.result_dir else name
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json({k: v for k, v in s.items() if not k.startswith("_")}, path)
    return path


def plot(s: dict, path: str) -> str:
    plt = pyplot()
    fig, (left, right, adapters) = plt.subplots(1, 3, figsize=(18, 4.5))
    metrics = [m for m in ("ttft", "tpot", "itl", "e2el") if f"mean_{m}_ms" in s]
    columns = ["median"] + [f"p{p:g}" for p in s["_percentiles"]]
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        values = [s[f"{column}_{m}_ms"] for m in metrics]
        left.bar([i + j * width for i in range(len(metrics))], values, width, label=column)
    left.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(metrics))],
                    [_TITLES[m][1] for m in metrics])
    left.set_ylabel("ms")
    left.set_yscale("log")
    left.set_title("Latency percentiles")
    left.legend()
    timeline = s["timeline"]
    t = [i * timeline["bin_seconds"] for i in range(len(timeline["output_tok_per_s"]))]
    right.plot(t, timeline["output_tok_per_s"], color="tab:blue", label="output tok/s")
    right.set_xlabel("time (s)")
    right.set_ylabel("output tokens / s", color="tab:blue")
    twin = right.twinx()
    twin.step(t, timeline["requests_in_flight"], color="tab:orange", where="post",
              label="requests in flight")
    twin.set_ylabel("requests in flight", color="tab:orange")
    right.set_title("Throughput over time")
    names = sorted(s["per_adapter"], key=lambda n: -s["per_adapter"][n]["requests"])[:40]
    xs = np.arange(len(names))
    for offset, key, label in ((-0.2, "mean_ttft_ms", "mean TTFT"),
                               (0.2, "mean_e2el_ms", "mean E2EL")):
        values = [s["per_adapter"][n][key] for n in names]
        adapters.bar(xs + offset, [np.nan if v is None else v for v in values], 0.4, label=label)
    adapters.set_xticks(xs, names, rotation=90, fontsize=7)
    adapters.set_ylabel("ms")
    adapters.set_yscale("log")
    adapters.set_title("Per adapter")
    adapters.legend()
    fig.suptitle(f"{s['model_id']} - {s['completed']} requests at {s['request_rate']} req/s, "
                 f"{len(s['lora_modules'])} adapters ({s['lora_popularity']})")
    fig.tight_layout()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


