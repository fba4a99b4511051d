"""Offline workloads for the end-to-end benchmarks: random prompts, arrival times, popularity,
and the loop that feeds an engine and measures what users see (output tokens/s, TTFT, TPOT),
overall and per adapter."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from moelora.bench.records import percentile


def random_workload(rng: random.Random, vocab: int, num_prompts: int, input_len: int,
                    request_rate: float) -> tuple[list[list[int]], list[float]]:
    """Random prompts of input_len tokens and their arrival times (all at 0 for rate inf,
    else a Poisson process)."""
    prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num_prompts)]
    arrivals, t = [], 0.0
    for _ in prompts:
        arrivals.append(t)
        if request_rate != float("inf"):
            t += rng.expovariate(request_rate)
    return prompts, arrivals


def popularity_weights(count: int, popularity: str, alpha: float = 1.0) -> list[float]:
    """Relative request weights of `count` adapters: uniform, or zipf (1 / rank**alpha)."""
    if popularity == "zipf":
        return [1.0 / (i + 1) ** alpha for i in range(count)]
    if popularity == "uniform":
        return [1.0] * count
    raise ValueError(f"popularity must be uniform or zipf, got {popularity!r}")


def _latencies(outs) -> tuple[list[float], list[float]]:
    ttft = [o.metrics.ttft for o in outs if o.metrics.ttft is not None]
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) /
            max(1, len(o.outputs[0].token_ids) - 1) for o in outs
            if o.metrics.first_token_time is not None and o.metrics.finished_time is not None]
    return ttft, tpot


def summarize(outs, elapsed: float) -> dict:
    """Output tokens/s, TTFT and TPOT p50/p99 (ms) and failures of finished requests."""
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft, tpot = _latencies(outs)
    return {"duration_s": elapsed, "output_tokens": generated,
            "output_tokens_per_s": generated / elapsed if elapsed > 0 else float("nan"),
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "tpot_p50_ms": 1e3 * percentile(tpot, 0.5), "tpot_p99_ms": 1e3 * percentile(tpot, 0.99),
            "failed": sum(o.outputs[0].finish_reason == "error" for o in outs)}


def per_adapter(outs, elapsed: float) -> dict[str, dict]:
    """The same summary per adapter name ("(base)" for requests without one)."""
    groups: dict[str, list] = {}
    for out in outs:
        name = out.lora_request.lora_name if out.lora_request is not None else "(base)"
        groups.setdefault(name, []).append(out)
    result = {}
    for name in sorted(groups):
        summary = summarize(groups[name], elapsed)
        result[name] = {"requests": len(groups[name]), **{
            k: summary[k] for k in ("output_tokens", "output_tokens_per_s", "ttft_p50_ms",
                                    "ttft_p99_ms", "tpot_p50_ms", "failed")}}
    return result


def run_requests(engine, prompts, loras, params, arrivals,
                 step: Callable | None = None) -> tuple[dict, list]:
    """Feeds the requests to `engine` at their arrival times (seconds from the start) and steps
    it until all finish. Returns (summary, finished RequestOutputs). `step` replaces
    engine.step (a StepTimer's, to time each step). The summary's add_request_s is the time
    spent queueing requests (a first request for an adapter registers it: parses its files)."""
    step = step or engine.step
    start = time.perf_counter()
    pending = list(range(len(prompts)))
    done = {}
    tag = f"{id(prompts)}-{start}"
    adding = 0.0
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and arrivals[pending[0]] <= now:
            i = pending.pop(0)
            added = time.perf_counter()
            engine.add_request(f"b{i}-{tag}", {"prompt_token_ids": prompts[i]}, params,
                               loras[i])
            adding += time.perf_counter() - added
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[pending[0]] - now))
            continue
        for out in step():
            if out.finished:
                done[out.request_id] = out
    elapsed = time.perf_counter() - start
    outs = list(done.values())
    return {**summarize(outs, elapsed), "add_request_s": adding}, outs


class StepProfile:
    """An engine.step for run_requests (wrapping `inner`, default engine.step) that notes each
    step's wall time and how many sequences were running after it. A run whose requests start
    spread out (a cold run, as adapters land) ends in a tail of steps run by a part of the
    batch, each costing nearly a full step: the summary counts the steps and seconds run with
    fewer than half of max_num_seqs, and gives the first and the longest step. With `trace`,
    it lists every step too: [start (seconds from the first step's), seconds, running and
    waiting sequences after it, adapters on the device after it, the CUDA allocator's
    cudaMalloc + cudaFree calls during it]."""

    def __init__(self, engine, max_num_seqs: int, inner: Callable[[], list] | None = None,
                 trace: bool = False):
        self.engine = engine
        self.max_num_seqs = max_num_seqs
        self.trace = trace
        self._inner = inner or engine.step
        self.seconds: list[float] = []
        self.running: list[int] = []
        self.rows: list[list] = []  # the trace
        self._first_start: float | None = None

    def step(self) -> list:
        calls = _allocator_calls(self.engine.device) if self.trace else 0
        start = time.perf_counter()
        outs = self._inner()
        self.seconds.append(time.perf_counter() - start)
        self.running.append(len(self.engine.scheduler.running))
        if self.trace:
            if self._first_start is None:
                self._first_start = start
            self.rows.append([round(start - self._first_start, 5), round(self.seconds[-1], 5),
                              self.running[-1], len(self.engine.scheduler.waiting),
                              self.engine.adapters.stats().get("on_device", 0),
                              _allocator_calls(self.engine.device) - calls])
        return outs

    def summary(self) -> dict:
        below = [s for s, n in zip(self.seconds, self.running) if 2 * n < self.max_num_seqs]
        steps = len(self.seconds)
        summary = {"steps": steps, "seconds": sum(self.seconds),
                   "mean_running": sum(self.running) / steps if steps else 0.0,
                   "steps_below_half_batch": len(below),
                   "seconds_below_half_batch": sum(below),
                   "first_step_s": self.seconds[0] if steps else None,
                   "longest_step_s": max(self.seconds, default=None)}
        if self.trace:
            summary["trace"] = self.rows
        return summary


def _allocator_calls(device) -> int:
    """cudaMalloc + cudaFree calls of torch's caching allocator so far (0 off CUDA)."""
    import torch

    if torch.device(device).type != "cuda":
        return 0
    stats = torch.cuda.memory_stats(device)
    return stats.get("num_device_alloc", 0) + stats.get("num_device_free", 0)


class AdapterTimeline:
    """An engine.step for run_requests that notes, after each step, when each of `loras` first
    became ready on the device: seconds from the first step, and the steps run by then. Where
    a cold run's time goes: loads that land late, or requests that join late."""

    def __init__(self, engine, loras):
        self.engine = engine
        self._waiting = {lora.lora_name: lora for lora in loras}
        self.ready: dict[str, tuple[float, int]] = {}  # name -> (seconds, steps)
        self._start: float | None = None
        self._steps = 0

    def step(self) -> list:
        if self._start is None:
            self._start = time.perf_counter()
        outs = self.engine.step()
        self._steps += 1
        now = time.perf_counter() - self._start
        adapters = self.engine.adapters
        for name, lora in list(self._waiting.items()):
            if adapters.ready(adapters.resolve(lora)):
                self.ready[name] = (now, self._steps)
                del self._waiting[name]
        return outs

    def summary(self) -> dict:
        """first / median / last ready seconds and the steps by the last, per adapter too."""
        times = sorted(seconds for seconds, _ in self.ready.values())
        return {"adapters_ready": len(times),
                "first_ready_s": times[0] if times else None,
                "median_ready_s": times[len(times) // 2] if times else None,
                "last_ready_s": times[-1] if times else None,
                "steps_to_last_ready": max((n for _, n in self.ready.values()), default=None),
                "ready_s": {name: round(seconds, 4)
                            for name, (seconds, _) in sorted(self.ready.items())}}

