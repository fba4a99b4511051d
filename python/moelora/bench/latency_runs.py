"""The runs of `moelora bench latency` (see latency.py for what is measured and why): warm-up,
interleaved timed rounds per batch size, then one probe per (sequences, adapters) for the
kernel count and the routing, done after all timing so the profiler never runs beside it."""

from __future__ import annotations

import math

import torch

from moelora.bench.records import engine_fields, median
from moelora.bench.step_probe import (
    RoutingCapture,
    StepTimer,
    count_step_kernels,
    steady_decode_steps,
)
from moelora.bench.weight_bytes import copy_rate_for, decode_step_bytes, stored_layout
from moelora.bench.workload import random_workload, run_requests

_ROUND_FIELDS = ("step_wall_ms", "step_gpu_ms", "output_tokens_per_s", "ttft_p50_ms",
                 "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "steady_steps")


class LatencyRuns:
    def __init__(self, engine, args, adapter_dir: str, rng):
        from moelora import SamplingParams

        self.engine = engine
        self.args = args
        self.loras = self._adapters(adapter_dir)
        self.params = SamplingParams(temperature=0.0, max_tokens=args.output_len,
                                     ignore_eos=True)
        vocab = engine.model.config.vocab_size
        self.prompts = {n: random_workload(rng, vocab, n, args.input_len, math.inf)[0]
                        for n in args.num_seqs}
        self._probes = 0
        self.kernel_count_mode = ("decode graph replay" if engine.runner.graphs is not None and
                                  engine.runner.graphs.capture else "eager step")

    def _adapters(self, adapter_dir: str) -> list:
        """The most adapters any count asks for, written once and loaded (warm) before timing."""
        from moelora import LoRARequest
        from moelora.bench.synthetic_adapters import write_adapters

        most = max(self.args.num_adapters)
        if most == 0:
            return []
        paths = write_adapters(adapter_dir, most, self.engine.executor.full_sites,
                               self.args.rank, seed=self.args.seed, device=self.engine.device)
        loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(paths)]
        for lora in loras:
            self.engine.adapters.preload(lora)
        return loras

    def _assignment(self, num_seqs: int, num_adapters: int) -> list:
        return [self.loras[i % num_adapters] if num_adapters else None for i in range(num_seqs)]

    def _run(self, num_seqs: int, num_adapters: int, timer: StepTimer | None = None) -> dict:
        prompts = self.prompts[num_seqs]
        summary, _ = run_requests(self.engine, prompts, self._assignment(num_seqs, num_adapters),
                                  self.params, [0.0] * num_seqs,
                                  step=timer.step if timer is not None else None)
        return summary

    def _timed(self, num_seqs: int, num_adapters: int) -> dict:
        with StepTimer(self.engine) as timer:
            summary = self._run(num_seqs, num_adapters, timer)
        steady = steady_decode_steps(timer.finish(), num_seqs)
        gpu = [s.gpu_ms for s in steady if s.gpu_ms is not None]
        return {**summary, "steady_steps": len(steady),
                "step_wall_ms": 1e3 * median([s.wall_s for s in steady]),
                "step_gpu_ms": median(gpu) if gpu else None}

    def measure(self) -> list[dict]:
        counts, rounds = self.args.num_adapters, {}
        for num_seqs in self.args.num_seqs:
            for count in counts:  # warm-up: this batch's graphs, allocator pools
                self._run(num_seqs, count)
            for _ in range(self.args.rounds):
                for count in counts:
                    rounds.setdefault((num_seqs, count), []).append(self._timed(num_seqs, count))
        return [self._record(num_seqs, count, rounds[(num_seqs, count)],
                             *self._probe(num_seqs, count))
                for num_seqs in self.args.num_seqs for count in counts]

    def _probe(self, num_seqs: int, num_adapters: int):
        """(kernels, copies, routing) of steady decode steps of this batch."""
        from moelora import SamplingParams

        args = self.args
        prefill_steps = math.ceil(num_seqs * args.input_len / args.max_num_batched_tokens)
        # enough tokens that the sequences first to finish prefill still decode in the two
        # probed steps after the first step with the whole batch decoding
        params = SamplingParams(temperature=0.0, max_tokens=prefill_steps + 8, ignore_eos=True)
        loras = self._assignment(num_seqs, num_adapters)
        self._probes += 1
        for i, prompt in enumerate(self.prompts[num_seqs]):
            self.engine.add_request(f"probe{self._probes}-{i}", {"prompt_token_ids": prompt},
                                    params, loras[i])
        with StepTimer(self.engine) as timer:
            while not steady_decode_steps(timer.steps, num_seqs):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"the {num_seqs} sequences never decoded in one step "
                                       f"(too little memory for their KV? lower --num-seqs)")
                timer.step()
        kernels, copies = count_step_kernels(self.engine)
        runner = self.engine.runner
        if kernels is not None and kernels < self.engine.model.config.num_layers and \
                runner.graphs is not None:
            # a profiler that does not see inside graph replays: count the same step eagerly
            graphs, runner.graphs = runner.graphs, None
            try:
                kernels, copies = count_step_kernels(self.engine)
            finally:
                runner.graphs = graphs
            self.kernel_count_mode = "eager step (the replay showed no kernels)"
        routing = RoutingCapture(self.engine).step()
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return kernels, copies, routing

    def _record(self, num_seqs: int, num_adapters: int, runs: list[dict], kernels, copies,
                routing) -> dict:
        engine, args = self.engine, self.args
        fields = engine_fields(engine)
        config, layout = engine.model.config, stored_layout(engine.model)
        context = args.input_len + args.output_len // 2
        kv_elem = torch.tensor([], dtype=engine.dtype).element_size()
        step = decode_step_bytes(config, layout, [context] * num_seqs,
                                 routing.experts_per_layer, kv_elem,
                                 lora_rank=args.rank if num_adapters else 0,
                                 adapters_per_layer=routing.adapters_per_layer,
                                 pairs_per_layer=routing.pairs_per_layer)
        base = decode_step_bytes(config, layout, [context] * num_seqs,
                                 routing.experts_per_layer, kv_elem)
        copy_rate = args.copy_rate or copy_rate_for(fields["device_name"])
        merged = {key: median([r[key] for r in runs if r[key] is not None]) for key in
                  _ROUND_FIELDS}
        roofline_ms = step.roofline_ms(copy_rate)
        graphs = engine.runner.graphs
        moe = [n for n, is_moe in zip(routing.experts_per_layer, config.moe_layers) if is_moe]
        return {
            "bench": "latency", "model": args.model, **fields, "weights": layout.name,
            "weights_requested": args.weights, "num_layers": config.num_layers,
            "num_seqs": num_seqs, "num_adapters": num_adapters,
            "adapters_in_batch": min(num_seqs, num_adapters), "rank": args.rank,
            "input_len": args.input_len, "output_len": args.output_len, "rounds": args.rounds,
            "decode_graphs": graphs is not None and graphs.capture,
            **merged,
            "kernels_per_step": kernels, "copies_per_step": copies,
            "kernel_count_mode": self.kernel_count_mode if kernels is not None else None,
            "roofline_ms": roofline_ms,
            "roofline_ratio": _over(merged["step_wall_ms"], roofline_ms),
            "roofline_gpu_ratio": _over(merged["step_gpu_ms"], roofline_ms),
            "roofline_base_ms": base.roofline_ms(copy_rate),
            "roofline_bytes": {"weights": step.weights, "experts": step.experts, "kv": step.kv,
                               "lora": step.lora, "total": step.total},
            "roofline_context_tokens": context, "copy_rate": copy_rate,
            "experts_per_layer_mean": sum(moe) / len(moe) if moe else 0.0,
            "routing_counted": routing.counted,
            "failed": sum(r["failed"] for r in runs),
            "rounds_output_tokens_per_s": [r["output_tokens_per_s"] for r in runs],
            "rounds_step_wall_ms": [r["step_wall_ms"] for r in runs],
        }


def _over(value: float | None, roofline: float | None) -> float | None:
    if value is None or roofline is None or roofline <= 0 or math.isnan(value):
        return None
    return value / roofline
