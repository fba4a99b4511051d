"""`moelora bench serve-synthetic`: a `vllm bench serve`-shaped run of `moelora serve` on a
synthetic model, start to finish in one command.

vLLM's published GPT-OSS-20B LoRA figures come from `vllm bench serve` at 16 concurrent requests
(128-token prompts, 800 generated tokens, ignore_eos). This command starts `moelora serve` on
--model (random weights at real shapes) with --num-adapters random rank --rank adapters and a
tokenizer covering the model's vocabulary (synthetic_tokenizer.py, so prompts are sized exactly
and text streams), waits for /health, sends --warmup-prompts short requests (step graphs of
every batch size captured, adapters loaded), runs `moelora bench serve` with the requests spread
over the adapters, saves its JSON (and --plot) in --result-dir, appends a compact record to
--out, and stops the server. --server-arg passes flags through to `moelora serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from moelora.bench import flags
from moelora.bench.records import append_record, pyplot

DEFAULT_OUT = os.path.join("bench", "results", "e2e.jsonl")


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    flags.describe(parser, __doc__)
    parser.add_argument("--model", default="synthetic:gpt-oss-20b", help="synthetic:<preset>")
    parser.add_argument("--num-adapters", type=int, default=1,
                        help="adapters served (0: the base model only)")
    parser.add_argument("--rank", type=flags.positive_int, default=16, help="adapter rank")
    parser.add_argument("--max-concurrency", type=flags.positive_int, default=16,
                        help="requests in flight")
    parser.add_argument("--num-prompts", type=flags.positive_int, default=64,
                        help="requests of the measured run")
    parser.add_argument("--random-input-len", type=flags.positive_int, default=128,
                        help="prompt tokens per request")
    parser.add_argument("--random-output-len", type=flags.positive_int, default=800,
                        help="generated tokens per request (ignore_eos)")
    parser.add_argument("--warmup-prompts", type=int, default=32,
                        help="short requests sent before the measured run")
    parser.add_argument("--device", default="auto", help="the server's --device")
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                        help="extra `moelora serve` flag (repeat; e.g. --server-arg=--enforce-eager)")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds to wait for the server's /health")
    parser.add_argument("--work-dir", default=None,
                        help="tokenizer, adapters and server log (default: a temporary "
                             "directory, removed at the end)")
    parser.add_argument("--result-dir", default=os.path.join("bench", "results"),
                        help="where the bench serve JSON (and plot) go")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="append a compact JSON line here ('-': none)")
    parser.add_argument("--plot", action="store_true", help="save the bench serve plot too")
    parser.add_argument("--seed", type=int, default=0, help="adapter weights and prompts")
    return parser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                tail = f.read()[-4000:]
            raise SystemExit(f"moelora serve exited ({proc.returncode}):\n{tail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"moelora serve not healthy after {timeout:.0f} s (log: {log_path})")


def device_name() -> str:
    """The GPU's name from nvidia-smi (this process keeps off the GPU), else "cpu"."""
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    return "cpu"


def _bench_args(args, url: str, adapters: list[str], num_prompts: int, output_len: int,
                result_name: str | None):
    from moelora.bench import serve

    argv = ["--base-url", url, "--num-prompts", str(num_prompts),
            "--max-concurrency", str(args.max_concurrency),
            "--random-input-len", str(args.random_input_len),
            "--random-output-len", str(output_len), "--seed", str(args.seed),
            "--metric-percentiles", "50,99", "--disable-tqdm"]
    if adapters:
        argv += ["--lora-modules", *adapters]
    if result_name:
        argv += ["--result-dir", args.result_dir, "--result-filename", result_name]
    return serve.add_cli_args(argparse.ArgumentParser()).parse_args(argv)


def server_command(args, tokenizer_dir: str, adapters: dict[str, str], port: int) -> list[str]:
    command = [sys.executable, "-m", "moelora.cli", "serve", args.model,
               "--tokenizer", tokenizer_dir, "--device", args.device,
               "--host", "127.0.0.1", "--port", str(port),
               "--max-num-seqs", str(max(64, args.max_concurrency)),
               "--max-lora-rank", str(args.rank), "--max-loras", str(max(1, len(adapters)))]
    if adapters:
        command += ["--lora-modules", *[f"{n}={p}" for n, p in adapters.items()]]
    return command + list(args.server_arg)


def run_from_args(args) -> int:
    from moelora.bench.synthetic_adapters import adapter_directory

    if not args.model.startswith("synthetic:"):
        raise SystemExit(f"--model must be synthetic:<preset>, got {args.model!r}")
    if args.plot:
        pyplot()  # before the run: a missing matplotlib stops it with its pip line
    with adapter_directory(args.work_dir, "moelora-serve-synthetic-") as work:
        return _run(args, work)


def _run(args, work: str) -> int:
    from moelora.bench import serve
    from moelora.bench.memory_check import lora_sites_of, model_config_of
    from moelora.bench.synthetic_adapters import write_adapters
    from moelora.bench.synthetic_tokenizer import write_synthetic_tokenizer

    config = model_config_of(args.model)
    tokenizer_dir = write_synthetic_tokenizer(os.path.join(work, "tokenizer"), config.vocab_size)
    paths = write_adapters(os.path.join(work, "adapters"), args.num_adapters,
                           lora_sites_of(args.model), args.rank, seed=args.seed)
    adapters = {f"a{i}": path for i, path in enumerate(paths)}
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    command = server_command(args, tokenizer_dir, adapters, port)
    log_path = os.path.join(work, "server.log")
    print("starting:", " ".join(command))
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, url, args.startup_timeout, log_path)
        startup_s = time.monotonic() - started
        print(f"server healthy after {startup_s:.0f} s")
        if args.warmup_prompts > 0:
            warm = _bench_args(args, url, list(adapters), args.warmup_prompts, 16, None)
            asyncio.run(serve.benchmark(warm))
        preset = args.model.removeprefix("synthetic:")
        name = (f"serve-{preset}-{len(adapters)}adapters-c{args.max_concurrency}-"
                f"{args.random_input_len}in-{args.random_output_len}out.json")
        bench = _bench_args(args, url, list(adapters), args.num_prompts,
                            args.random_output_len, name)
        summary, _ = asyncio.run(serve.benchmark(bench))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    summary.update(bench="serve-synthetic", model=args.model, device_name=device_name(),
                   server_command=command, server_startup_s=startup_s)
    serve.print_report(summary)
    print(f"results saved to {serve.save_result(summary, bench)}")
    if args.plot:
        print(f"plot saved to {serve.plot(summary, os.path.join(args.result_dir, name[:-5] + '.png'))}")
    if args.out != "-":
        append_record(compact_record(summary, args, len(adapters)), args.out)
        print(f"record appended to {args.out}")
    return 0 if summary["failed"] == 0 else 1


def compact_record(summary: dict, args, num_adapters: int) -> dict:
    """The serve run as one e2e.jsonl line."""
    return {"bench": "serve", "model": args.model, "device_name": summary["device_name"],
            "num_seqs": args.max_concurrency, "num_adapters": num_adapters, "rank": args.rank,
            "num_prompts": args.num_prompts, "input_len": args.random_input_len,
            "output_len": args.random_output_len, "completed": summary["completed"],
            "failed": summary["failed"], "duration_s": summary["duration"],
            "output_tokens_per_s": summary["output_throughput"],
            "ttft_p50_ms": summary["median_ttft_ms"], "ttft_p99_ms": summary["p99_ttft_ms"],
            "tpot_p50_ms": summary["median_tpot_ms"], "tpot_p99_ms": summary["p99_tpot_ms"],
            "itl_p50_ms": summary["median_itl_ms"], "prompt_sizing": summary["prompt_sizing"],
            "server_command": summary["server_command"]}


def main(argv=None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="moelora bench serve-synthetic"))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
