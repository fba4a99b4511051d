"""`moelora bench cold-ttft`: what a request for a cold adapter waits, against what its bytes cost.

An engine decodes --background-seqs base-model sequences (ignore_eos, topped up as they finish),
so every step is a steady decode step. Then, one at a time, a request arrives for each of
--num-adapters adapters that live on disk only (their files' pages dropped from the page cache):
an --input-len-token prompt and one generated token, with nothing else queued ahead of it. Its
TTFT is held against issue 21's bound:

    bound = the adapter's file bytes / the plain parallel read rate of the same file
            + two decode steps

where the plain read (--threads threads, 64 MiB chunks, page cache dropped before and after) runs
just before the request in the same process, and a decode step is the median wall time of the
background's steps before the first request. Also reported: the steps that ran while the
adapter loaded, before the step that scheduled the request (median and max wall ms: no step may
wait for another request's adapter); that step's own wall time (it runs the prefill too) and
the next one's (with async scheduling a step waits there for the one before it); the
disk -> host load's time and, inside it, the time spent obtaining and page-locking its host
buffer (with --host-block-mb that runs beside the read, so it may be as long as the load); and
whether the device copy streamed, block by block beside the read (it does once the host buffer
is page-locked when the read starts: the host reserve's blocks are).

Prints one row per adapter and saves one JSON record (medians and every row).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import time

from moelora.bench import flags
from moelora.bench.adapters import drop_page_cache, plain_parallel_read
from moelora.bench.records import append_record, dumps, engine_fields, format_table, median

TABLE = [("adapter", "adapter"), ("file_mb", "file MB"), ("plain_read_gbps", "plain GB/s"),
         ("bound_ms", "bound ms"), ("ttft_ms", "TTFT ms"), ("ratio_to_bound", "TTFT / bound"),
         ("host_load_ms", "disk->host ms"), ("host_buffer_ms", "of it buffer ms"),
         ("streamed", "streamed"),
         ("steps_loading", "steps loading"), ("step_max_ms", "slowest of them ms"),
         ("admitted_step_ms", "its prefill step ms"), ("next_step_ms", "next step ms")]


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    flags.describe(parser, __doc__)
    parser.add_argument("--model", default="synthetic:tiny-moe",
                        help="synthetic:<preset> or a model directory")
    parser.add_argument("--num-layers", type=flags.positive_int, default=None,
                        help="build only this many layers of a synthetic model")
    parser.add_argument("--num-adapters", type=flags.positive_int, default=4,
                        help="cold adapters, requested one after another")
    parser.add_argument("--rank", type=flags.positive_int, default=16, help="adapter rank")
    parser.add_argument("--background-seqs", type=int, default=16,
                        help="base-model sequences decoding meanwhile (0: an idle engine)")
    parser.add_argument("--input-len", type=flags.positive_int, default=32,
                        help="prompt tokens of every request")
    parser.add_argument("--threads", type=flags.positive_int, default=4,
                        help="reader threads of the plain read")
    flags.add_host_block_argument(parser)
    flags.add_host_reserve_argument(parser)
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep the files in the page cache (measures memory, not storage)")
    flags.add_graph_arguments(parser)
    flags.add_engine_placement_arguments(parser, seed_help="prompts and adapter weights")
    parser.add_argument("--out", default=None, help="append the JSON record to this file")
    return parser


class _Background:
    """Keeps `count` base-model sequences decoding and times every engine step."""

    def __init__(self, engine, count: int, input_len: int, rng: random.Random):
        from moelora import SamplingParams

        self.engine, self.count, self.step_ms = engine, count, []
        self._prompt = [rng.randrange(engine.model.config.vocab_size) for _ in range(input_len)]
        self._params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
        self._live: set[str] = set()
        self._ids = itertools.count()

    def step(self) -> list:
        """Tops the background up, runs one engine step, returns its outputs."""
        while len(self._live) < self.count:
            request_id = f"background-{next(self._ids)}"
            self.engine.add_request(request_id, {"prompt_token_ids": self._prompt},
                                    self._params, None)
            self._live.add(request_id)
        start = time.perf_counter()
        outs = self.engine.step()
        self.step_ms.append(1e3 * (time.perf_counter() - start))
        for out in outs:
            if out.finished:
                self._live.discard(out.request_id)
        return outs

    def steady_step_ms(self, warmup: int = 12, timed: int = 24) -> float | None:
        """The median wall time of `timed` steps after `warmup` (None without a background)."""
        if self.count == 0:
            return None
        for _ in range(warmup):
            self.step()
        first = len(self.step_ms)
        for _ in range(timed):
            self.step()
        return median(self.step_ms[first:])


def _probe(engine, background: _Background, lora, prompt: list[int], args) -> dict:
    """One request for `lora`, cold: its plain read, then its TTFT with the background running."""
    from moelora import SamplingParams

    path = os.path.join(lora.lora_path, "adapter_model.safetensors")
    file_bytes = os.path.getsize(path)
    if not args.warm_cache:
        drop_page_cache([path])
    plain_s = plain_parallel_read([path], args.threads)
    if not args.warm_cache:
        drop_page_cache([path])
    request_id = f"cold-{lora.lora_name}"
    first_step = len(background.step_ms)
    before = engine.adapters.stats()
    engine.add_request(request_id, {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), lora)
    admitted_step = None  # index into step_ms of the step that scheduled the request
    while True:
        outs = background.step() if background.count else engine.step()
        if admitted_step is None and not any(seq.request_id == request_id
                                             for seq in engine.scheduler.waiting):
            admitted_step = len(background.step_ms) - 1
        done = [out for out in outs if out.request_id == request_id and out.finished]
        if done:
            break
    out = done[0]
    if out.outputs[0].finish_reason == "error":
        raise SystemExit(f"the request for {lora.lora_name} failed: {out.outputs[0].text}")
    # The steps while its adapter loaded ran other requests only; the step that scheduled it
    # also ran its prefill (a step graph where the step fits one) and is reported on its own,
    # as is the step after it: with async scheduling a step() launches its step and waits for
    # the one before, so the prefill's GPU time shows there.
    loading = background.step_ms[first_step:admitted_step]
    admitted_ms = background.step_ms[admitted_step] if admitted_step is not None else None
    next_ms = (background.step_ms[admitted_step + 1]
               if admitted_step is not None and admitted_step + 1 < len(background.step_ms)
               else None)
    during = background.step_ms[first_step:]
    after = engine.adapters.stats()
    return {"adapter": lora.lora_name, "file_bytes": file_bytes, "file_mb": file_bytes / 1e6,
            "plain_read_s": plain_s, "plain_read_gbps": file_bytes / plain_s / 1e9,
            "ttft_ms": 1e3 * out.metrics.ttft, "steps_during": len(during),
            # the disk -> host load and, inside it, obtaining and page-locking its host buffer
            "host_load_ms": 1e3 * (after["host_load_seconds"] - before["host_load_seconds"]),
            "host_buffer_ms": 1e3 * (after["host_buffer_seconds"] - before["host_buffer_seconds"]),
            # whether its device copy ran block by block beside the read
            "streamed": after["device_loads_streamed"] > before["device_loads_streamed"],
            "steps_loading": len(loading),
            "step_median_ms": median(loading) if loading else None,
            "step_max_ms": max(loading) if loading else None,
            "admitted_step_ms": admitted_ms, "next_step_ms": next_ms}


def run_from_args(args) -> int:
    from moelora import LoRARequest
    from moelora.bench.synthetic_adapters import adapter_directory, write_adapters
    from moelora.engine.config import EngineConfig
    from moelora.engine.llm_engine import LLMEngine

    if args.background_seqs < 0:
        raise SystemExit(f"--background-seqs must be >= 0, got {args.background_seqs}")
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          enable_lora=True, max_lora_rank=args.rank,
                          max_loras=args.num_adapters, max_cpu_loras=args.num_adapters,
                          max_num_seqs=max(args.background_seqs + 1, 2), seed=args.seed,
                          load_progress=False, synthetic_num_layers=args.num_layers,
                          **flags.graph_options(args),
                          adapter_host_block_bytes=flags.host_block_bytes(args),
                          adapter_host_reserve_bytes=flags.host_reserve_bytes(args))
    engine = LLMEngine(config)
    rng = random.Random(args.seed)
    try:
        with adapter_directory(args.adapter_dir, "moelora-bench-cold-ttft-") as adapter_dir:
            paths = write_adapters(adapter_dir, args.num_adapters, engine.model.lora_sites(),
                                   args.rank, seed=args.seed, device=engine.device)
            loras = [LoRARequest(f"cold{i}", i + 1, p) for i, p in enumerate(paths)]
            background = _Background(engine, args.background_seqs, args.input_len, rng)
            step_ms = background.steady_step_ms()
            prompt = [rng.randrange(engine.model.config.vocab_size) for _ in range(args.input_len)]
            rows = [_probe(engine, background, lora, prompt, args) for lora in loras]
        fields = {**engine_fields(engine), "num_layers": engine.model.config.num_layers,
                  "decode_graphs": engine.runner.graphs is not None}
    finally:
        engine.stop()
    two_steps_ms = 2 * step_ms if step_ms is not None else 0.0
    for row in rows:
        row["bound_ms"] = 1e3 * row["plain_read_s"] + two_steps_ms
        row["ratio_to_bound"] = row["ttft_ms"] / row["bound_ms"]
    record = {"bench": "cold_ttft", "model": args.model, **fields, "rank": args.rank,
              "num_adapters": args.num_adapters, "background_seqs": args.background_seqs,
              "input_len": args.input_len, "threads": args.threads,
              "page_cache": "kept warm" if args.warm_cache else "dropped",
              "host_block_bytes": flags.host_block_bytes(args),
              "host_reserve_mb": args.host_reserve_mb,
              "step_ms": step_ms,
              **{key: median([row[key] for row in rows])
                 for key in ("ttft_ms", "bound_ms", "ratio_to_bound", "plain_read_gbps")},
              "rows": rows}
    print(f"{args.model} ({record['num_layers']} layers), rank {args.rank}, "
          f"{args.background_seqs} sequences decoding, steady step "
          f"{'-' if step_ms is None else f'{step_ms:.2f}'} ms, page cache {record['page_cache']}")
    print(format_table(TABLE, rows))
    print(f"median TTFT {record['ttft_ms']:.1f} ms against a bound of {record['bound_ms']:.1f} ms "
          f"({record['ratio_to_bound']:.2f}x; issue 21's target: <= 1)")
    print(dumps(record))
    append_record(record, args.out)
    return 0


def main(argv=None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="moelora bench cold-ttft"))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
