"""The `moelora` command: demo, generate, bench and config."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from moelora.demo.run import run_demo

    run_demo(num_requests=args.num_requests, max_tokens=args.max_tokens, device=args.device,
             cache_dir=args.cache_dir, max_loras=args.max_loras)
    return 0


def _generate(args) -> int:
    from moelora import LLM, LoRARequest, SamplingParams

    llm = LLM(model=args.model, device=args.device, dtype=args.dtype,
              enable_lora=bool(args.lora), max_lora_rank=args.max_lora_rank)
    lora = None
    if args.lora:
        name, _, path = args.lora.partition("=")
        if not path:
            raise SystemExit("--lora takes name=path")
        lora = LoRARequest(name, 1, path)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed)
    for out in llm.generate(args.prompt, params, lora_request=lora):
        print(out.outputs[0].text if out.outputs[0].text else out.outputs[0].token_ids)
    return 0


def _serve(args) -> int:
    from moelora.entrypoints.openai.api_server import run_server

    return run_server(args)


def missing_modules(names: list[str]) -> list[str]:
    """Which of the named top-level modules cannot be imported (checked without importing)."""
    import importlib.util

    return [name for name in names if importlib.util.find_spec(name) is None]


def _bench_serve(args) -> int:
    needed = ["aiohttp"] + (["matplotlib"] if args.plot is not None else [])
    missing = missing_modules(needed)
    if missing:
        # The packages by name: the line works for a wheel and a source install alike (both
        # are in the `bench` extra).
        print(f"moelora bench serve needs {' and '.join(missing)}: "
              f"pip install {' '.join(missing)}", file=sys.stderr)
        return 2
    from moelora.bench.serve import run_from_args

    return run_from_args(args)


def _bench_offline(args) -> int:
    from moelora.bench.offline import run_from_args

    return run_from_args(args)


def _bench_scale(args) -> int:
    from moelora.bench.scale import run_from_args

    return run_from_args(args)


def _config(args) -> int:
    import moelora

    if args.cmake_prefix:
        print(moelora.cmake_prefix_path())
    else:
        print(f"moelora {moelora.__version__}; CUDA built: {moelora.built_with_cuda()}, "
              f"available: {moelora.cuda_available()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "kernels"]:  # its own parser takes every remaining flag
        from moelora.bench.kernels import main as kernels_main

        kernels_main(argv[2:])
        return 0
    if argv[:2] == ["bench", "attention"]:  # likewise
        from moelora.bench.attention import main as attention_main

        return attention_main(argv[2:])
    parser = argparse.ArgumentParser(prog="moelora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="serve a mixed multi-adapter workload on a tiny model")
    demo.add_argument("--num-requests", type=int, default=48)
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.add_argument("--max-loras", type=int, default=2,
                      help="adapters resident on the device at once")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--cache-dir", default=None)
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="generate from one or more prompts")
    gen.add_argument("model")
    gen.add_argument("prompt", nargs="+")
    gen.add_argument("--lora", default=None, help="name=path of a PEFT adapter")
    gen.add_argument("--max-lora-rank", type=int, default=64)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.set_defaults(func=_generate)

    # The server's and benchmark's flag parsers import nothing heavy (no fastapi, aiohttp).
    from moelora.bench.serve import add_cli_args as add_bench_serve_args
    from moelora.entrypoints.openai.cli_args import add_cli_args as add_serve_args

    serve = sub.add_parser("serve", help="OpenAI-compatible server (vLLM's flags)")
    add_serve_args(serve)
    serve.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_serve = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server")
    add_bench_serve_args(bench_serve)
    bench_serve.set_defaults(func=_bench_serve)
    from moelora.bench.offline import add_cli_args as add_bench_offline_args

    bench_offline = bench_sub.add_parser(
        "offline", help="offline throughput with many adapters vs none (same process)")
    add_bench_offline_args(bench_offline)
    bench_offline.set_defaults(func=_bench_offline)
    from moelora.bench.scale import add_cli_args as add_bench_scale_args

    bench_scale = bench_sub.add_parser(
        "scale", help="throughput as adapters grow past the GPU's slots (8 to 512 by default)")
    add_bench_scale_args(bench_scale)
    bench_scale.set_defaults(func=_bench_scale)
    from moelora.bench.commands import add_bench_commands

    add_bench_commands(bench_sub)
    # `moelora bench kernels|attention ...` are dispatched above to their modules' own parsers.
    bench_sub.add_parser("kernels", help="time the MoE-LoRA kernels on the BENCHMARKS.md grid "
                                         "(GPU; see `moelora bench kernels --help`)")
    bench_sub.add_parser("attention", help="time paged decode attention over long contexts "
                                           "(GPU; see `moelora bench attention --help`)")

    config = sub.add_parser("config", help="build information")
    config.add_argument("--cmake-prefix", action="store_true",
                        help="print the CMAKE_PREFIX_PATH for find_package(moelora)")
    config.set_defaults(func=_config)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
