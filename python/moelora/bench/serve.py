"""`moelora bench serve`: load-test any OpenAI-compatible server over HTTP.

Requests arrive as a Poisson process at --request-rate (gamma-distributed gaps with
--burstiness != 1; `inf` sends all at once), at most --max-concurrency in flight. Prompts are
random token-ish text of about --random-input-len tokens (exact with --tokenizer), each asking
for --random-output-len tokens with ignore_eos so that the length is what was asked for.
Requests are spread over the adapters of --lora-modules with uniform or Zipf popularity.
Every request streams, so time to first token (TTFT), time per output token (TPOT), inter-token
latency (ITL) and end-to-end latency (E2EL) are measured per request. The report has the lines
of `vllm bench serve`; --save-result writes JSON and --plot a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from tqdm.auto import tqdm

TIMEOUT_S = 6 * 60 * 60  # one request may take this long
_LETTERS = "etaoinshrdlucmfwypvbgkjqxz"


@dataclass
class RequestSpec:
    prompt: str
    output_len: int
    model: str
    adapter: str | None


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


# -- the command line ------------------------------------------------------------------------
def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--base-url", default=None,
                        help="server URL, e.g. http://127.0.0.1:8000 (default from host/port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", default="/v1/completions",
                        choices=["/v1/completions", "/v1/chat/completions"])
    parser.add_argument("--model", default=None,
                        help="base model name (default: the first model the server lists)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second (inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival gaps (1 = Poisson)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--random-input-len", type=int, default=128)
    parser.add_argument("--random-output-len", type=int, default=32)
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths are uniform in [L*(1-r), L*(1+r)]")
    parser.add_argument("--tokenizer", default=None,
                        help="directory with tokenizer.json: makes input lengths exact")
    parser.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME",
                        help="adapter names to spread requests over (name=path also accepted)")
    parser.add_argument("--lora-popularity", default="uniform", choices=["uniform", "zipf"])
    parser.add_argument("--zipf-alpha", type=float, default=1.0)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="do not send ignore_eos (for servers that reject it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    parser.add_argument("--metric-percentiles", default="99",
                        help="comma-separated percentiles to report, e.g. 50,90,99")
    parser.add_argument("--save-result", action="store_true")
    parser.add_argument("--result-dir", default=None)
    parser.add_argument("--result-filename", default=None)
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                        help="draw latency percentiles and throughput over time")
    parser.add_argument("--disable-tqdm", action="store_true")
    return parser


def _validate(args) -> None:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be > 0 (inf for all at once)")
    if args.burstiness <= 0:
        raise ValueError("--burstiness must be > 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if args.random_input_len < 1 or args.random_output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    if not 0.0 <= args.random_range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")


# -- the workload ----------------------------------------------------------------------------
def _random_word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 7)))


def random_prompt(rng: random.Random, num_tokens: int, tokenizer=None) -> str:
    """Random token-ish text: `num_tokens` words, or exactly `num_tokens` tokens of the given
    tokenizer."""
    if tokenizer is None:
        return " ".join(_random_word(rng) for _ in range(num_tokens))
    words, ids = [], []
    while len(ids) < num_tokens:
        words.extend(_random_word(rng) for _ in range(max(1, num_tokens - len(ids))))
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
    return tokenizer.decode(ids[:num_tokens])


def adapter_weights(n: int, popularity: str, alpha: float) -> list[float]:
    if popularity == "zipf":
        return [1.0 / (i + 1) ** alpha for i in range(n)]
    return [1.0] * n


def make_requests(args, base_model: str, tokenizer=None) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    adapters = [spec.partition("=")[0] for spec in args.lora_modules]
    weights = adapter_weights(len(adapters), args.lora_popularity, args.zipf_alpha)

    def length(mean: int) -> int:
        low = max(1, math.floor(mean * (1 - args.random_range_ratio)))
        high = max(low, math.ceil(mean * (1 + args.random_range_ratio)))
        return rng.randint(low, high)

    specs = []
    for _ in range(args.num_prompts):
        adapter = rng.choices(adapters, weights)[0] if adapters else None
        specs.append(RequestSpec(random_prompt(rng, length(args.random_input_len), tokenizer),
                                 length(args.random_output_len), adapter or base_model, adapter))
    return specs


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps before each request: gamma(shape=burstiness, mean=1/rate); 0 for rate=inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return list(rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n))


# -- one request -----------------------------------------------------------------------------
def _payload(spec: RequestSpec, endpoint: str, ignore_eos: bool) -> dict:
    body = {"model": spec.model, "max_tokens": spec.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


def _chunk_text(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            text += choice.get("text") or ""
        else:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


async def send_request(session, url: str, headers: dict,
                       spec: RequestSpec, endpoint: str, ignore_eos: bool,
                       t0: float) -> RequestResult:
    result = RequestResult(model=spec.model, adapter=spec.adapter)
    start = time.perf_counter()
    result.start = start - t0
    last = start
    chunks_with_text = 0
    try:
        async with session.post(url, json=_payload(spec, endpoint, ignore_eos),
                                headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return result
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    now = time.perf_counter()
                    for line in event.decode("utf-8").splitlines():
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            continue
                        chunk = json.loads(payload)
                        if "error" in chunk:
                            raise RuntimeError(chunk["error"].get("message", str(chunk)))
                        usage = chunk.get("usage")
                        if usage:
                            result.prompt_tokens = usage.get("prompt_tokens", 0)
                            result.output_tokens = usage.get("completion_tokens", 0)
                        text = _chunk_text(chunk)
                        if not text:
                            continue
                        if chunks_with_text == 0:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        chunks_with_text += 1
                        last = now
                        result.token_times.append(now - t0)
                        result.text += text
        result.latency = time.perf_counter() - start
        if result.output_tokens == 0:
            result.output_tokens = chunks_with_text
        result.success = chunks_with_text > 0
        if not result.success:
            result.error = "the response had no tokens"
    except Exception as exc:  # noqa: BLE001 - a failed request is a data point
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# -- the run ---------------------------------------------------------------------------------
def _base_url(args) -> str:
    return (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")


async def _first_model(session, base_url: str, headers: dict) -> str:
    async with session.get(base_url + "/v1/models", headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"GET /v1/models: HTTP {response.status}: "
                               f"{(await response.text())[:300]}")
        models = (await response.json())["data"]
    base = [m["id"] for m in models if not m.get("parent")]
    if not base:
        raise RuntimeError("the server lists no base model")
    return base[0]


async def benchmark(args) -> tuple[dict, list[RequestResult]]:
    import aiohttp  # the `moelora` command builds its parser without it

    _validate(args)
    base_url = _base_url(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    tokenizer = None
    if args.tokenizer:
        from moelora.engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"no tokenizer.json in {args.tokenizer}")
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = args.model or await _first_model(session, base_url, headers)
        specs = make_requests(args, model, tokenizer)
        url = base_url + args.endpoint
        print("Starting initial single prompt test run...")
        probe = await send_request(session, url, headers, specs[0], args.endpoint,
                                   args.ignore_eos, time.perf_counter())
        if not probe.success:
            raise RuntimeError(f"the test request failed: {probe.error}")
        print("Initial test run completed. Starting main benchmark run...")
        gaps = arrival_gaps(len(specs), args.request_rate, args.burstiness, args.seed)
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = tqdm(total=len(specs), disable=args.disable_tqdm, desc="requests")

        async def one(spec, t0):
            if limit is None:
                result = await send_request(session, url, headers, spec, args.endpoint,
                                            args.ignore_eos, t0)
            else:
                async with limit:
                    result = await send_request(session, url, headers, spec, args.endpoint,
                                                args.ignore_eos, t0)
            bar.update(1)
            return result

        t0 = time.perf_counter()
        tasks = []
        for spec, gap in zip(specs, gaps):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(one(spec, t0)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    summary = summarize(results, duration, args, model, base_url)
    return summary, results


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
            "mean_ttft_ms": 1000 * float(np.mean([r.ttft for r in mine])) if mine else None,
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
    with open(path, "w") as f:
        json.dump({k: v for k, v in s.items() if not k.startswith("_")}, f, indent=1)
    return path


def plot(s: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
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
    fig.suptitle(f"{s['model_id']} - {s['completed']} requests at {s['request_rate']} req/s, "
                 f"{len(s['lora_modules'])} adapters ({s['lora_popularity']})")
    fig.tight_layout()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args) -> dict:
    """Runs the benchmark the arguments describe, prints the report, saves what was asked."""
    summary, _ = asyncio.run(benchmark(args))
    print_report(summary)
    if args.save_result or args.result_dir or args.result_filename:
        print(f"results saved to {save_result(summary, args)}")
    if args.plot is not None:
        target = args.plot or os.path.join(args.result_dir or ".",
                                           f"moelora-bench-serve-{summary['date']}.png")
        print(f"plot saved to {plot(summary, target)}")
    return summary


def run_from_args(args) -> int:
    """The `moelora bench serve` command: 0 when every request succeeded."""
    import aiohttp

    try:
        summary = run(args)
    except (ValueError, RuntimeError, OSError, aiohttp.ClientError) as exc:
        raise SystemExit(f"moelora bench serve: {exc}") from exc
    return 0 if summary["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="moelora bench serve",
                                                  description=__doc__))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
