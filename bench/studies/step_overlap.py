"""Wall time against GPU time per decode step, with async scheduling off and on, in one run.

    PYTHONPATH=python python3 bench/studies/step_overlap.py --model synthetic:gpt-oss-20b --seqs 64
    PYTHONPATH=python python3 bench/studies/step_overlap.py --model synthetic:qwen3-30b-a3b \
        --layers 24 --seqs 16 --adapters 16

For each mode the engine decodes `--seqs` sequences (128-token prompts, ignore_eos) until every
one is past its prefill and a few steps more, then times `--steps` engine steps with the host clock (wall ms per
step), and `--steps` more under torch.profiler for the GPU ms per step: the time some kernel or
copy ran (the union of their intervals); and their ratio (the target: 1.05 or less).
Decode graphs follow the engine's default (on for a one-process CUDA engine). One JSON line per
mode; the card is named in each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from moelora import LoRARequest, SamplingParams
from moelora.bench.synthetic_adapters import write_random_adapter
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def busy_us(prof) -> float:
    """Microseconds during which at least one GPU activity ran."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def measure(args, asynchronous: bool, adapter_dir: str | None) -> dict:
    options = {"model": args.model, "device": args.device, "async_scheduling": asynchronous,
               "dtype": "bfloat16" if args.device == "cuda" else "float32",
               "max_num_seqs": args.seqs, "load_progress": False}
    if args.layers:
        options["synthetic_num_layers"] = args.layers
    if args.device == "cpu":
        options["pool_memory_bytes"] = 256 << 20
    if args.adapters:
        options.update(enable_lora=True, max_lora_rank=16, max_loras=args.adapters)
    engine = LLMEngine(EngineConfig(**options))
    loras = [None] * args.seqs
    if args.adapters:
        sites = engine.model.lora_sites()
        requests = [LoRARequest(f"a{i}", i + 1, write_random_adapter(
            f"{adapter_dir}/a{i}", sites, 16, seed=i)) for i in range(args.adapters)]
        for request in requests:
            engine.adapters.preload(request)
        loras = [requests[i % args.adapters] for i in range(args.seqs)]
    params = SamplingParams(temperature=0.0, max_tokens=2 * args.steps + 64, ignore_eos=True)
    for i in range(args.seqs):
        engine.add_request(str(i), [(i * 13 + j) % 1000 + 1 for j in range(128)], params, loras[i])
    while any(seq.num_computed_tokens < len(seq.prompt_token_ids)
              for state in engine._requests.values() for seq in state.seqs):
        engine.step()
    for _ in range(8):
        engine.step()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()  # the host clock, without the profiler's cost per launch
    for _ in range(args.steps):
        engine.step()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    gpu_ms = None
    if cuda:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
        gpu_ms = busy_us(prof) / 1e3 / args.steps
    record = {"bench": "step_overlap",
              "device_name": torch.cuda.get_device_name() if cuda else "cpu",
              "model": args.model, "num_layers": engine.model.config.num_layers,
              "num_seqs": args.seqs, "num_adapters": args.adapters,
              "async_scheduling": asynchronous,
              "decode_graphs": engine.runner.graphs is not None,
              "step_wall_ms": round(wall_ms, 3),
              "step_gpu_ms": round(gpu_ms, 3) if gpu_ms else None,
              "wall_over_gpu": round(wall_ms / gpu_ms, 3) if gpu_ms else None,
              "overlapped_steps": engine.stats.get("overlapped_steps", 0)}
    engine.shutdown()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:gpt-oss-20b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (no GPU time)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as adapter_dir:
        for asynchronous in (False, True):
            print(json.dumps(measure(args, asynchronous, adapter_dir)), flush=True)


if __name__ == "__main__":
    main()
