"""Disk -> host -> pool throughput of adapter loads on the CPU (the host side of every load).

Writes N random rank-16 adapters for a synthetic model (2 layers of qwen3-30b-a3b by default:
fused-expert PEFT tensors, the case where a per-expert view reads a B tensor column-wise),
registers them, then times prefetch + wait of all of them with --threads host workers (one
adapter each) and --pack-threads threads packing one adapter (0: automatic).
Usage: PYTHONPATH=python python3 bench/studies/adapter_packing.py --threads 1 4
       PYTHONPATH=python python3 bench/studies/adapter_packing.py --adapters 1 --threads 1 \
           --pack-threads 1 2
"""

from __future__ import annotations

import argparse
import os
import time

from moelora import LoRARequest
from moelora.bench.synthetic_adapters import write_random_adapter
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="synthetic:qwen3-30b-a3b")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--pack-threads", type=int, nargs="+", default=[0])
    parser.add_argument("--adapter-dir", default="/tmp/moelora-packing-adapters")
    args = parser.parse_args()
    for threads, pack in [(t, p) for t in args.threads for p in args.pack_threads]:
        engine = LLMEngine(EngineConfig(
            args.model, device="cpu", dtype="bfloat16", enable_lora=True, max_lora_rank=16,
            max_loras=args.adapters, max_cpu_loras=args.adapters, load_progress=False,
            synthetic_num_layers=args.num_layers, pool_memory_bytes=2 << 30,
            adapter_load_threads=threads, adapter_pack_threads=pack))
        sites = engine.model.lora_sites()
        paths = []
        for i in range(args.adapters):
            path = os.path.join(args.adapter_dir, f"a{i}")
            if not os.path.exists(os.path.join(path, "adapter_config.json")):
                write_random_adapter(path, sites, 16, seed=i)
            paths.append(path)
        ids = [engine.adapters.resolve(LoRARequest(f"a{i}", i + 1, p))
               for i, p in enumerate(paths)]
        megabytes = sum(os.path.getsize(os.path.join(p, "adapter_model.safetensors"))
                        for p in paths) / 1e6
        start = time.perf_counter()
        for adapter_id in ids:
            engine.adapters.cache.prefetch(adapter_id)
        for adapter_id in ids:
            engine.adapters.cache.wait(adapter_id)
        seconds = time.perf_counter() - start
        print(f"threads={threads} pack_threads={pack}: {len(ids)} adapters, {megabytes:.0f} MB on disk, "
              f"{seconds:.3f} s, {megabytes / seconds:.0f} MB/s", flush=True)
        engine.stop()


if __name__ == "__main__":
    main()
