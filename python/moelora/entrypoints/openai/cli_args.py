"""The arguments of `moelora serve` (vLLM's names). Kept free of heavy imports so that the
`moelora` command can build its parser without FastAPI installed."""

from __future__ import annotations

import argparse
import json
import os
import re

from moelora.entrypoints.openai.vllm_flags import add_vllm_flags
from moelora.graph_flags import add_graph_arguments

DEFAULT_MAX_REQUEST_BODY_BYTES = 4 << 20  # a 128k-token prompt as token ids is ~0.9 MB
DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory (HF format) or synthetic:<preset>")
    parser.add_argument("--demo", action="store_true",
                        help="serve the tiny demo model and its five adapters (built once)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000,
                        help="port to listen on (bound before the model loads)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="names of the base model in the API (default: the model path)")
    parser.add_argument("--api-key", default=os.environ.get("MOELORA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--enable-lora", action="store_true",
                        help="accept adapters (implied by --lora-modules or runtime updating)")
    parser.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                        help="adapters served from the start, as name=path or a JSON object "
                             "with 'name' and 'path'")
    parser.add_argument("--enable-runtime-lora-updating", action="store_true",
                        help="allow /v1/load_lora_adapter and /v1/unload_lora_adapter")
    parser.add_argument("--allowed-lora-dirs", nargs="+", default=[], metavar="DIR",
                        help="runtime loads outside these directories are refused")
    parser.add_argument("--max-loras", type=int, default=8,
                        help="adapters resident on the device at once")
    parser.add_argument("--lora-prefetch-slots", type=int, default=0,
                        help="device slots beyond --max-loras that no step uses: adapters "
                             "queued requests wait for load into them while a step runs")
    parser.add_argument("--max-lora-rank", type=int, default=16,
                        help="largest adapter rank accepted")
    parser.add_argument("--max-cpu-loras", type=int, default=None,
                        help="adapters kept in host memory (default 4 x max-loras)")
    parser.add_argument("--lora-host-reserve-mb", type=int, default=None,
                        help="host memory kept ready (faulted in, page-locked) for adapters "
                             "loaded from disk, in MB (default: one largest adapter per device "
                             "slot, at most 16 GiB and 1/8 of the machine's memory; 0: none)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16",
                                                            "bfloat16", "half", "float"],
                        help="model dtype (auto: the checkpoint's; bfloat16 on a GPU for "
                             "float32 checkpoints)")
    parser.add_argument("--device", default="auto",
                        help="cuda, cuda:N or cpu (auto: cuda when available)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory or Hugging Face id (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=64,
                        help="sequences in one batch at most")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="tokens in one step at most (prefill chunks to fit)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (default: the model's context)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                        help="fraction of the GPU's memory the server may use; the unified "
                             "KV/adapter pool gets what the model leaves")
    parser.add_argument("--kv-cache-memory-bytes", type=memory_bytes, default=None,
                        metavar="BYTES",
                        help="size of the unified KV/adapter page pool, on a GPU or a CPU "
                             "(overrides --gpu-memory-utilization); vLLM's units: 1k = 1000, "
                             "1K = 1024, also 512MiB, 2GB, 2G")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="processes (one per GPU) sharing the model over torch.distributed")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="partition the experts over the tensor-parallel processes")
    add_graph_arguments(parser)
    add_vllm_flags(parser)
    parser.add_argument("--enable-prefix-caching", action="store_true",
                        help="reuse the KV cache of identical prompt prefixes (per adapter)")
    parser.add_argument("--max-waiting-requests", type=int, default=None,
                        help="beyond this many waiting requests new ones get 503 + Retry-After")
    parser.add_argument("--max-request-body-bytes", type=memory_bytes,
                        default=DEFAULT_MAX_REQUEST_BODY_BYTES, metavar="BYTES",
                        help="larger request bodies get 413 (default 4MiB); parsing a body "
                             "holds the GIL in one call, so the limit also bounds that pause")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="accept a chat_template sent with a request (refused otherwise, "
                             "as in vLLM); it still renders in the sandbox with time and size "
                             "limits")
    parser.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                        metavar="SECONDS",
                        help="on SIGTERM, how long requests in flight may run before they are "
                             "cut; new requests get 503 meanwhile, and the exit status is 0")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of requests that give none")
    parser.add_argument("--uvicorn-log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="uvicorn's own log level")
    return parser


_MEMORY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_UNITS = "kmgt"


def memory_bytes(text: str) -> int:
    """A byte count as vLLM reads one: a plain number, or with k/m/g/t (powers of 1000) or
    K/M/G/T (powers of 1024); a trailing 'iB' is binary and 'B' decimal ('512MiB', '2GB')."""
    match = _MEMORY.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 536870912, "
                                         f"512MiB, 2G, 1.5GB)")
    number, unit, suffix = match.groups()
    power = _UNITS.index(unit.lower()) + 1 if unit else 0
    binary = unit.isupper() if suffix is None else suffix.lower() == "ib"
    value = float(number) * (1024 if binary else 1000) ** power
    if not 1 <= value <= 2 ** 62:
        raise argparse.ArgumentTypeError(f"byte count out of range: {text!r}")
    return int(value)


def parse_lora_modules(specs: list[str]) -> dict[str, str]:
    modules = {}
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("{"):
            try:
                entry = json.loads(spec)
                name, path = entry["name"], entry["path"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"--lora-modules: bad JSON entry {spec!r}: {exc}") from exc
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules takes name=path, got {spec!r}")
        if name in modules:
            raise ValueError(f"--lora-modules: adapter name '{name}' given twice")
        modules[name] = path
    return modules
