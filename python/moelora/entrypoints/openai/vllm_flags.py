"""`vllm serve` flags that a user's scripts carry, beyond those cli_args.py defines as moelora's
own: each either does here what it does in vLLM, is accepted with a one-line warning where it
cannot apply and is harmless, or is refused with the reason (exit status 2). Also vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING environment switch."""

from __future__ import annotations

import argparse
import os

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
_TRUE = {"1", "true", "yes", "on"}
KV_CACHE_DTYPES = ["auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"]
LORA_DTYPES = ["auto", "bfloat16", "float16", "float32"]


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                        help="the model, as the positional argument (vLLM's older spelling)")
    parser.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                        help="a jinja chat template (a file path or the template itself) "
                             "replacing the tokenizer's")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="accepted for vLLM's command lines; moelora runs no code from "
                             "model repositories (its own implementation of each family)")
    parser.add_argument("--block-size", type=int, default=16,
                        help="tokens per KV-cache page")
    parser.add_argument("--max-logprobs", type=int, default=20,
                        help="the most logprobs / prompt_logprobs a request may ask for")
    parser.add_argument("--disable-log-requests", action="store_true",
                        help="accepted for vLLM's command lines (requests are never logged)")
    parser.add_argument("--disable-log-stats", action="store_true",
                        help="accepted for vLLM's command lines (no periodic stats are logged; /metrics has them)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="read tool calls back from the model's output (needs "
                             "--tool-call-parser)")
    parser.add_argument("--tool-call-parser", default=None,
                        help="the format of the model's tool calls: hermes (Qwen2/Qwen3 and "
                             "Hermes-style templates)")
    parser.add_argument("--lora-dtype", default="auto", choices=LORA_DTYPES,
                        help="adapter dtype (adapters always run in the model's dtype: any "
                             "other value is accepted with a warning)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="KV cache dtype: auto (the model's dtype) or that dtype itself; "
                             "fp8 caches are refused (not implemented)")


def apply_vllm_flags(args: argparse.Namespace) -> list[str]:
    """Folds the vLLM flags into the namespace moelora reads; returns the warnings to print.
    Raises ValueError (the server exits 2 with it) for a flag that cannot be honoured."""
    warnings = []
    if args.model_flag is not None:
        if args.model is not None and args.model != args.model_flag:
            raise ValueError(f"two models given: {args.model!r} and --model {args.model_flag!r}")
        args.model = args.model_flag
    if os.environ.get(RUNTIME_LORA_ENV, "").strip().lower() in _TRUE:
        args.enable_runtime_lora_updating = True
    if args.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
    if args.max_logprobs < 0:
        raise ValueError(f"--max-logprobs must be >= 0, got {args.max_logprobs}")
    if args.enable_auto_tool_choice:
        if args.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (e.g. hermes)")
        from moelora.entrypoints.openai.tool_parsers import tool_parser

        tool_parser(args.tool_call_parser)  # ValueError naming the parsers offered
    elif args.tool_call_parser is not None:
        warnings.append(f"--tool-call-parser {args.tool_call_parser}: ignored without "
                        f"--enable-auto-tool-choice")
    if args.kv_cache_dtype.startswith("fp8"):
        raise ValueError(f"--kv-cache-dtype {args.kv_cache_dtype}: fp8 KV caches are not "
                         f"implemented; the cache is kept in the model's dtype (auto)")
    if args.kv_cache_dtype != "auto" and args.dtype not in ("auto", args.kv_cache_dtype):
        raise ValueError(f"--kv-cache-dtype {args.kv_cache_dtype} differs from --dtype "
                         f"{args.dtype}: the cache is kept in the model's dtype")
    if args.lora_dtype != "auto" and args.lora_dtype != args.dtype:
        warnings.append(f"--lora-dtype {args.lora_dtype}: adapters run in the model's dtype "
                        f"({args.dtype})")
    if args.trust_remote_code:
        warnings.append("--trust-remote-code: accepted; moelora runs no code from model "
                        "repositories")
    return warnings


def read_chat_template(value: str | None) -> str | None:
    """--chat-template's text: the file it names, else the value itself when it reads as a
    template (vLLM's rule); a path that does not exist and is no template is an error."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: no such file, and not a jinja template")


__all__ = ["RUNTIME_LORA_ENV", "add_vllm_flags", "apply_vllm_flags", "read_chat_template"]
