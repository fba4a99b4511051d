"""`moelora bench serve`: load-test any OpenAI-compatible server over HTTP.

Requests arrive as a Poisson process at --request-rate (gamma-distributed gaps with
--burstiness != 1; `inf` sends all at once), at most --max-concurrency in flight. Prompts are
random words cut to exactly --random-input-len tokens of the model's tokenizer: --tokenizer's,
else the server's own through its /tokenize and /detokenize routes (vLLM's); only a server
without them gets word-count prompts, with a warning. Each asks for --random-output-len tokens
with ignore_eos so that the length is what was asked for.
Requests are spread over the adapters of --lora-modules with uniform or Zipf popularity.
Every request streams, so time to first token (TTFT), time per output token (TPOT), inter-token
latency (ITL) and end-to-end latency (E2EL) are measured per request. The report has the lines
of `vllm bench serve` and a line per adapter; --save-result writes strict JSON (no Infinity or
NaN) and --plot a PNG (latency percentiles, throughput over time, per-adapter latency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time

import numpy as np
from tqdm.auto import tqdm

from moelora.bench.flags import describe
from moelora.bench.records import pyplot
from moelora.bench.serve_prompts import (
    RequestSpec,
    ServerTokenizer,
    ServerTokenizerUnavailable,
    make_requests,
    make_requests_sized_by_server,
)
from moelora.bench.serve_report import RequestResult, plot, print_report, save_result, summarize

TIMEOUT_S = 6 * 60 * 60  # one request may take this long


# -- the command line ------------------------------------------------------------------------
def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    describe(parser, __doc__)
    parser.add_argument("--base-url", default=None,
                        help="server URL, e.g. http://127.0.0.1:8000 (default from host/port)")
    parser.add_argument("--host", default="127.0.0.1", help="server host (without --base-url)")
    parser.add_argument("--port", type=int, default=8000, help="server port (without --base-url)")
    parser.add_argument("--endpoint", default="/v1/completions",
                        choices=["/v1/completions", "/v1/chat/completions"],
                        help="the OpenAI route to load")
    parser.add_argument("--model", default=None,
                        help="base model name (default: the first model the server lists)")
    parser.add_argument("--api-key", default=None,
                        help="bearer token (falls back to $OPENAI_API_KEY; never printed)")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second (inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival gaps (1 = Poisson)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="requests in flight at most (default: no limit)")
    parser.add_argument("--random-input-len", type=int, default=128,
                        help="prompt tokens per request")
    parser.add_argument("--random-output-len", type=int, default=32,
                        help="generated tokens per request")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths are uniform in [L*(1-r), L*(1+r)]")
    parser.add_argument("--tokenizer", default=None,
                        help="directory with tokenizer.json to size prompts with (default: the "
                             "server's /tokenize)")
    parser.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME",
                        help="adapter names to spread requests over (name=path also accepted)")
    parser.add_argument("--lora-popularity", default="uniform", choices=["uniform", "zipf"],
                        help="how requests pick their adapter")
    parser.add_argument("--zipf-alpha", type=float, default=1.0,
                        help="exponent of the zipf popularity")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="do not send ignore_eos (for servers that reject it)")
    parser.add_argument("--seed", type=int, default=0, help="prompts, adapters and arrivals")
    parser.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                        help="metrics whose percentiles are printed")
    parser.add_argument("--metric-percentiles", default="99",
                        help="comma-separated percentiles to report, e.g. 50,90,99")
    parser.add_argument("--save-result", action="store_true", help="write the results as JSON")
    parser.add_argument("--result-dir", default=None,
                        help="directory of the JSON results (implies --save-result)")
    parser.add_argument("--result-filename", default=None,
                        help="file name of the JSON results (implies --save-result)")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                        help="draw latency percentiles, throughput over time and per-adapter "
                             "latency")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
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
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
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
        specs, sizing = await _sized_requests(args, model, tokenizer, session, base_url, headers)
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
    summary["prompt_sizing"] = sizing
    return summary, results


async def _sized_requests(args, model: str, tokenizer, session, base_url: str,
                          headers: dict) -> tuple[list[RequestSpec], str]:
    """The requests and how their prompts were sized (see serve_prompts.py)."""
    if tokenizer is not None:
        return make_requests(args, model, tokenizer), f"tokenizer {args.tokenizer}"
    try:
        server = ServerTokenizer(session, base_url, headers, model)
        return await make_requests_sized_by_server(args, model, server), "server /tokenize"
    except ServerTokenizerUnavailable as exc:
        print(f"warning: prompt lengths are approximate ({args.random_input_len} words, not "
              f"tokens): the server cannot tokenize ({exc}); pass --tokenizer DIR")
        return make_requests(args, model), "words (approximate)"


def run(args) -> dict:
    """Runs the benchmark the arguments describe, prints the report, saves what was asked."""
    if args.plot is not None:
        pyplot()  # before the run: a missing matplotlib stops it with its pip line
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
    try:
        import aiohttp
    except ImportError as exc:
        raise SystemExit("moelora bench serve needs aiohttp: pip install aiohttp") from exc
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
