"""Serve a mixed workload (several adapters of different ranks plus base requests) on the tiny
demo model through the engine, and print what happened."""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time

from moelora.demo.assets import ADAPTERS, build_demo_assets, demo_lora_requests

PROMPTS = ["Tell me a story about", "The capital of France is", "def fibonacci(n):",
           "Once upon a time", "The best recipe for soup", "In the court of law,",
           "Ahoy, the sea was", "Roses are red,"]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    try:
        os.makedirs(base, exist_ok=True)
        return os.path.join(base, "moelora", "demo")
    except OSError:
        return os.path.join(tempfile.gettempdir(), "moelora-demo")


def run_demo(num_requests: int = 48, max_tokens: int = 24, device: str = "auto",
             cache_dir: str | None = None, max_loras: int = 2, seed: int = 0) -> dict:
    from moelora import LLM, SamplingParams

    cache_dir = cache_dir or default_cache_dir()
    print(f"demo assets in {cache_dir}")
    model_dir, adapter_dirs = build_demo_assets(cache_dir)
    llm = LLM(model=model_dir, device=device, enable_lora=True, max_lora_rank=16,
              max_loras=max_loras, max_cpu_loras=len(ADAPTERS), max_num_seqs=16,
              max_num_batched_tokens=256, seed=seed)
    lora_requests = demo_lora_requests(adapter_dirs)
    rng = random.Random(seed)
    # Zipf-like popularity: the first adapters are asked for most; about one request in six
    # uses the base model.
    weights = [1.0 / (i + 1) for i in range(len(lora_requests))]
    prompts, loras = [], []
    for i in range(num_requests):
        prompts.append(PROMPTS[i % len(PROMPTS)])
        loras.append(None if rng.random() < 1 / 6 else rng.choices(lora_requests, weights)[0])
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=loras)
    elapsed = time.perf_counter() - start

    engine = llm.llm_engine
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttfts = sorted(o.metrics.ttft for o in outputs if o.metrics.ttft is not None)
    adapter_stats = engine.adapters.stats()
    pool_stats = engine.memory.pool.stats()
    summary = {
        "requests": len(outputs),
        "adapters": len({lr.lora_name for lr in loras if lr is not None}),
        "elapsed_s": elapsed,
        "output_tokens_per_s": generated / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "adapter_stats": adapter_stats,
        "pool": pool_stats,
        "preemptions": engine.stats["preemptions"],
    }
    _print_summary(summary, engine)
    _print_samples(prompts, loras, outputs, llm, params)
    return summary


def _print_summary(s: dict, engine) -> None:
    pool = s["pool"]
    rows = [
        ("device", str(engine.device)),
        ("requests", s["requests"]),
        ("adapters used", s["adapters"]),
        ("output tokens/s", f"{s['output_tokens_per_s']:.1f}"),
        ("TTFT p50 / p99", f"{s['ttft_p50_ms']:.1f} ms / {s['ttft_p99_ms']:.1f} ms"),
        ("adapter loads / evictions", (f"{s['adapter_stats'].get('device_loads', 0)} / "
                                       f"{s['adapter_stats'].get('device_evictions', 0)}")),
        ("preemptions", s["preemptions"]),
        ("pool pages (total)", pool["total_pages"]),
        ("pool pages kv / adapter / free", (f"{pool['kv_pages']} / {pool['adapter_pages']} / "
                                            f"{pool['free_pages']}")),
        ("page size", f"{pool['page_bytes']} bytes"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _print_samples(prompts, loras, outputs, llm, params) -> None:
    """The same prompt under every adapter: the demo model is random, so its text is noise,
    but the token ids show each adapter steering the output away from the base model's."""
    prompt = prompts[0]
    names = [None] + list(dict.fromkeys(lr for lr in loras if lr is not None))
    samples = llm.generate([prompt] * len(names), params, lora_request=names, use_tqdm=False)
    base_tokens = samples[0].outputs[0].token_ids
    print(f"\nSame prompt {prompt!r} under each adapter (greedy, first 10 tokens):")
    for lora, out in zip(names, samples):
        label = lora.lora_name if lora is not None else "(base)"
        tokens = out.outputs[0].token_ids
        note = "" if lora is None else ("  same as base" if tokens == base_tokens else
                                        "  differs from base")
        print(f"  {label:<8} {tokens[:10]}{note}")
