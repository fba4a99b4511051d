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


def _config(args) -> int:
    import moelora

    if args.cmake_prefix:
        print(moelora.cmake_prefix_path())
    else:
        print(f"moelora {moelora.__version__}; CUDA built: {moelora.built_with_cuda()}, "
              f"available: {moelora.cuda_available()}")
    return 0


def main(argv: list[str] | None = None) -> int:
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

    config = sub.add_parser("config", help="build information")
    config.add_argument("--cmake-prefix", action="store_true",
                        help="print the CMAKE_PREFIX_PATH for find_package(moelora)")
    config.set_defaults(func=_config)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
