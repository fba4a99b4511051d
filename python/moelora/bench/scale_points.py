"""The runs of `moelora bench scale` (see scale.py): the no-adapter baseline per arrival rate,
then one cold point per (popularity, rate, adapter count)."""

from __future__ import annotations

import math
import statistics
import time

from moelora.bench.records import ratio
from moelora.bench.workload import popularity_weights, random_workload, run_requests


class ScalePoints:
    def __init__(self, engine, args, adapter_dir: str, rng):
        from moelora import SamplingParams
        from moelora.bench.synthetic_adapters import write_adapters

        self.engine, self.args, self.rng = engine, args, rng
        self.params = SamplingParams(temperature=0.0, max_tokens=args.output_len,
                                     ignore_eos=True)
        self.counts = sorted(set(args.adapter_counts))
        self.paths = write_adapters(adapter_dir, self.counts[-1], engine.executor.full_sites,
                                    args.rank, seed=args.seed, device=engine.device)
        self.vocab = engine.model.config.vocab_size
        self._next_id = 1  # adapter ids are never reused, so every point starts cold

    def _workload(self, rate: float):
        return random_workload(self.rng, self.vocab, self.args.num_prompts, self.args.input_len,
                               rate)

    def _baseline(self, rate: float) -> dict:
        prompts, arrivals = self._workload(rate)
        run, _ = run_requests(self.engine, prompts, [None] * len(prompts), self.params,
                              arrivals)
        return {**run, "request_rate": rate, "requests_per_s": len(prompts) / run["duration_s"]}

    def measure(self) -> tuple[list[dict], list[dict]]:
        """(no-adapter runs, one per rate; points)."""
        args = self.args
        prompts, arrivals = self._workload(math.inf)
        # warm-up on the whole workload (its batch shapes: step graphs, allocator pools), so
        # that the no-adapter baseline does not pay it
        run_requests(self.engine, prompts, [None] * len(prompts), self.params, arrivals)
        base_all_at_once = self._baseline(math.inf)
        rates = []
        for rate in args.request_rate:
            if rate == "auto":
                rate = round(args.auto_rate_fraction * base_all_at_once["requests_per_s"], 3)
            if rate not in rates:
                rates.append(rate)
        base = {math.inf: base_all_at_once}
        for rate in rates:
            if rate not in base:
                base[rate] = self._baseline(rate)
        points = []
        for popularity in args.popularity:
            for rate in rates:
                for count in self.counts:
                    points.append(self._point(popularity, rate, count))
                fewest = points[-len(self.counts)]["output_tokens_per_s"]
                for point in points[-len(self.counts):]:
                    point["relative_to_fewest"] = ratio(point["output_tokens_per_s"], fewest)
                    point["relative_to_no_adapters"] = ratio(point["output_tokens_per_s"],
                                                             base[rate]["output_tokens_per_s"])
        return [base[rate] for rate in base if rate in rates or rate == math.inf], points

    def _point(self, popularity: str, rate: float, count: int) -> dict:
        from moelora import LoRARequest

        engine = self.engine
        loras = []
        for index in range(count):
            loras.append(LoRARequest(f"n{self._next_id}-a{index}", self._next_id,
                                     self.paths[index]))
            self._next_id += 1
        if self.args.warm_host:  # S-LoRA's setting: host copies (as many as the tier holds)
            engine.adapters.preload_all(loras, up_to=0)
        else:  # registered up front, as a server's --lora-modules: no weights read
            for lora in loras:
                engine.adapters.resolve(lora)
        prompts, arrivals = self._workload(rate)
        weights = popularity_weights(count, popularity)
        chosen = [self.rng.choices(loras, weights)[0] for _ in prompts]
        before = engine.adapters.stats()
        occupancy = BatchOccupancy(engine)
        run, _ = run_requests(engine, prompts, chosen, self.params, arrivals, occupancy.step)
        after = engine.adapters.stats()
        for lora in loras:  # frees the registrations and copies before the next point
            engine.adapters.unload(lora.lora_name)
        return {**run, "popularity": popularity, "request_rate": rate, "num_adapters": count,
                "host_warm": (min(count, engine.config.max_cpu_loras) if self.args.warm_host
                              else 0),
                "distinct_adapters_used": len({lora.lora_int_id for lora in chosen}),
                "requests_per_s": len(prompts) / run["duration_s"],
                "device_loads": after["device_loads"] - before["device_loads"],
                "device_evictions": after["device_evictions"] - before["device_evictions"],
                "host_loads": after["host_loads"] - before["host_loads"],
                "bytes_loaded": after["bytes_loaded"] - before["bytes_loaded"],
                **occupancy.summary()}


class BatchOccupancy:
    """Where a point's steps go: how full they ran, how many of them ran short of max_num_seqs
    while queued requests waited for their adapters to reach the device (the scheduler's
    count), how many ran nothing, and their wall times (a median step as fast as with fewer
    adapters, but a longer mean, says some steps waited)."""

    def __init__(self, engine):
        self.engine = engine
        self.running = 0
        self.empty = 0
        self.step_ms: list[float] = []
        self.short_before = engine.scheduler.num_short_for_adapters

    def step(self):
        start = time.perf_counter()
        outputs = self.engine.step()
        self.step_ms.append(1e3 * (time.perf_counter() - start))
        running = len(self.engine.scheduler.running)
        self.running += running
        self.empty += running == 0
        return outputs

    def summary(self) -> dict:
        steps = len(self.step_ms)
        return {"steps": steps,
                "mean_running": self.running / steps if steps else 0.0,
                "steps_short_for_adapters":
                    self.engine.scheduler.num_short_for_adapters - self.short_before,
                "steps_empty": self.empty,
                "step_ms_median": statistics.median(self.step_ms) if steps else None,
                "step_ms_mean": statistics.fmean(self.step_ms) if steps else None,
                "step_ms_max": max(self.step_ms) if steps else None}
