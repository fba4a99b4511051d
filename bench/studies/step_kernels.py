"""Where a decode step's GPU time goes, kernel by kernel, without adapters and with N warm ones,
in one engine.

    PYTHONPATH=python python3 bench/studies/step_kernels.py --model synthetic:gpt-oss-20b \
        --weights mxfp4 --seqs 16 --adapters 16

The engine decodes `--seqs` sequences (128-token prompts, ignore_eos) past their prefill, then
profiles `--steps` steady decode steps (torch.profiler, CUPTI durations; decode graphs replay as
the engine runs them) and groups the GPU kernels by name: launches and microseconds per step,
and their share of the step's busy time. One JSON line per adapter count (top kernels first);
--top rows of a table each. Run with 0 adapters and N in the same engine, so the difference is
what the adapters add. `overlap_us_per_step` is the kernels' summed time less the busy time:
the time kernels ran beside another (each one past the first counted), e.g. the LoRA stream's
beside the base ops'; it needs no kernel names (a graph's launches may come back unnamed).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict

import torch
from moelora import LoRARequest, SamplingParams
from moelora.bench.engine_options import weights_options
from moelora.bench.synthetic_adapters import write_random_adapter
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine
from step_overlap import busy_us
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def short_name(name: str) -> str:
    """A kernel's name without template arguments and parameter lists."""
    name = name.replace("(anonymous namespace)", "anon")
    name = re.sub(r"\(.*\)$", "", name)
    depth, out = 0, []
    for ch in name:
        depth += ch == "<"
        if depth == 0:
            out.append(ch)
        depth -= ch == ">"
    base = "".join(out).replace("void ", "").strip()
    return base.split("::")[-1][:60]


def decode_until_steady(engine, seqs: int, loras: list, max_tokens: int) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = len(engine._requests)
    for i in range(seqs):
        engine.add_request(f"r{start}-{i}", [(i * 13 + j) % 1000 + 1 for j in range(128)],
                           params, loras[i])
    while any(seq.num_computed_tokens < len(seq.prompt_token_ids)
              for state in engine._requests.values() for seq in state.seqs):
        engine.step()
    for _ in range(8):
        engine.step()


def profile_steps(engine, steps: int, trace: str | None = None) -> tuple[dict, float]:
    """({kernel: [launches, total us]}, busy us) over `steps` engine steps; `trace`: a Chrome
    trace of them is written there."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else lambda: None
    sync()
    cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    if trace:
        prof.export_chrome_trace(trace)
    kernels: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        entry = kernels[short_name(event.name)]
        entry[0] += 1
        entry[1] += event.time_range.end - event.time_range.start
    return kernels, busy_us(prof)


def finish(engine) -> None:
    for request_id in list(engine._requests):
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:gpt-oss-20b")
    parser.add_argument("--weights", default="mxfp4", choices=["bf16", "mxfp4", "fp8"])
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None, help="append the JSON lines here")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (no kernels)")
    parser.add_argument("--eager", action="store_true",
                        help="no decode graphs (the profiler names every kernel launched eagerly; "
                             "some launched from a graph come back unnamed)")
    parser.add_argument("--trace", default=None,
                        help="write Chrome traces of the profiled steps to TRACE-<adapters>.json")
    args = parser.parse_args()
    options = {"model": args.model, "device": args.device,
               "dtype": "bfloat16" if args.device == "cuda" else "float32",
               "max_num_seqs": args.seqs, "load_progress": False, "enable_lora": True,
               "max_lora_rank": 16, "max_loras": max(args.adapters, 1),
               **(weights_options(args.weights) or {})}
    if args.eager:
        options["decode_graphs"] = False
    if args.layers:
        options["synthetic_num_layers"] = args.layers
    engine = LLMEngine(EngineConfig(**options))
    with tempfile.TemporaryDirectory() as adapter_dir:
        sites = engine.model.lora_sites()
        requests = [LoRARequest(f"a{i}", i + 1, write_random_adapter(
            f"{adapter_dir}/a{i}", sites, 16, seed=i)) for i in range(args.adapters)]
        for request in requests:
            engine.adapters.preload(request)
        for count in (0, args.adapters):
            loras = [requests[i % count] if count else None for i in range(args.seqs)]
            decode_until_steady(engine, args.seqs, loras, 4 * args.steps + 64)
            trace = f"{args.trace}-{count}.json" if args.trace else None
            kernels, busy = profile_steps(engine, args.steps, trace)
            finish(engine)
            rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
            summed = sum(us for _, us in kernels.values())
            record = {"bench": "step_kernels", "device_name": (torch.cuda.get_device_name()
                                                               if args.device == "cuda" else "cpu"),
                      "model": args.model, "weights": args.weights,
                      "num_layers": engine.model.config.num_layers, "num_seqs": args.seqs,
                      "num_adapters": count, "decode_graphs": not args.eager,
                      "busy_us_per_step": round(busy / args.steps, 1),
                      "kernel_us_per_step": round(summed / args.steps, 1),
                      "overlap_us_per_step": round((summed - busy) / args.steps, 1),
                      "kernels": [{"name": name, "per_step": n / args.steps,
                                   "us_per_step": round(us / args.steps, 1)}
                                  for name, (n, us) in rows]}
            print(f"\n{args.model} {args.weights}, {args.seqs} seqs, {count} adapters: "
                  f"{record['busy_us_per_step']} us busy per step, "
                  f"{record['overlap_us_per_step']} us of it with kernels overlapping")
            for row in record["kernels"][:args.top]:
                print(f"  {row['us_per_step']:9.1f} us {row['per_step']:6.1f}x  {row['name']}")
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    engine.shutdown()


if __name__ == "__main__":
    main()
