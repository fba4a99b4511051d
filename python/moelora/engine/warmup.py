"""What a CUDA engine loads and runs once when it starts, so that no serving step pays a first use.

CUDA loads a kernel on its first launch (lazy module loading, CUDA's default). The step graphs'
captures launch every kernel of the sizes they cover when the engine starts; larger steps
(prompt chunks) run eagerly and take other kernels: other LoRA forms, tile sizes and splits (the
plan picks them by pairs and adapters, src/plan.cpp), the alignment pass, cuBLAS's large-M
GEMMs, prefill attention. The first such step of the process would load them while requests
wait (docs/performance.md, "Cold adapters"). Loading every module eagerly
(CUDA_MODULE_LOADING=EAGER) is not the cure: that loads all of torch's kernels too.

So a CUDA engine, once at start:
1. loads every kernel of libmoelora (_C.preload_cuda_kernels: every module of cuda/, whichever
   instances a step may pick);
2. runs the smallest and the largest eager step size through the model, without LoRA and with
   it (one adapter, and as many as a step may hold), then the logits and both samplers over 1
   and max_num_seqs rows: torch's and cuBLAS's kernels for those shapes.
Every token of those passes is a padding token of the block table's padding row: it writes no
KV (slot -1), takes no adapter (slot -1: the LoRA kernels launch and find nothing to do) and
attends to page 0 only, so nothing in the pool is read as data or changed. Prompt-like positions
(0..255 per sequence) and spans make the attention path the one a real prompt chunk takes.
"""

from __future__ import annotations

import logging
import time

import torch
from moelora import _C
from moelora.engine.device_sampler import DeviceSampleRequest, sample_on_device
from moelora.engine.paged_context import PagedContext
from moelora.engine.prefill_attention import PrefillSpan
from moelora.engine.sampling_params import SamplingParams
from moelora.engine.step_inputs import step_metadata

log = logging.getLogger("moelora")

SPAN_TOKENS = 256  # a warm-up sequence's prompt chunk


def eager_step_sizes(max_tokens: int, largest_graph: int | None) -> list[int]:
    """The token counts warmed up: the smallest step that runs eagerly (one past the largest
    graph's, 1 without graphs) and the largest (max_num_batched_tokens)."""
    smallest = 1 if largest_graph is None else largest_graph + 1
    return sorted({smallest, max_tokens}) if smallest <= max_tokens else []


def adapter_counts(lora: bool, max_per_step: int) -> list[int | None]:
    """Per size: a pass without LoRA (None), then with 1 and max_per_step adapters (the plan's
    block size and form depend on the number of adapters)."""
    return [None, *sorted({1, max_per_step})] if lora else [None]


@torch.inference_mode()
def warm_up_eager_steps(runner, sizes: list[int], counts: list[int | None],
                        sample_rows: int) -> int:
    """Runs each size x adapter count (`counts`, see adapter_counts) through the runner's model
    with padding tokens, then the logits and sampling of 1 and `sample_rows` rows. Returns the
    passes run."""
    passes = 0
    for size in sizes:
        for num_adapters in counts:
            if num_adapters is not None and runner.lora_views is None:
                continue
            _padding_pass(runner, size, num_adapters)
            passes += 1
    for rows in sorted({1, sample_rows}):
        _sample_pass(runner, rows)
    return passes


def _sample_pass(runner, rows: int) -> None:
    """The logits of `rows` rows and both samplers over them (greedy rows, and temperature /
    top-k / top-p rows with logprobs)."""
    config = runner.model.config
    hidden = torch.zeros(rows, config.hidden_size, dtype=runner.model.lm_head_matrix.dtype,
                         device=runner.device)
    logits = runner.logits(hidden)
    generator = torch.Generator(device=runner.device)
    requests = [DeviceSampleRequest(params, None if params.greedy else generator, (0,), 1, [],
                                    [0])
                for params in (SamplingParams(temperature=0.0),
                               SamplingParams(temperature=0.8, top_p=0.9, top_k=20, logprobs=2))]
    sample_on_device(logits, [requests[i % 2] for i in range(rows)]).wait()


def _padding_pass(runner, size: int, num_adapters: int | None) -> torch.Tensor:
    device, tables = runner.device, runner.tables
    padding = tables.padding_row
    span = min(size, SPAN_TOKENS)
    index = torch.arange(size, dtype=torch.int32, device=device)
    ids = index % runner.model.config.vocab_size
    positions = index % span
    rows = torch.full((size,), padding, dtype=torch.int32, device=device)
    slots = None if num_adapters is None else torch.full_like(rows, -1)
    seq_lens = torch.zeros(tables.rows + 1, dtype=torch.int32, device=device)
    seq_lens[padding] = span
    width = -(-span // runner.block_tokens)
    spans = tuple(PrefillSpan(first, min(span, size - first), padding, 0)
                  for first in range(0, size, span))
    ids64, meta = step_metadata(ids, positions, rows, slots, seq_lens, tables.view(width),
                                runner.block_tokens, padding_row=padding,
                                num_adapters=num_adapters, num_seqs=len(spans), spans=spans,
                                paged_tokens=torch.empty(0, dtype=torch.long, device=device))
    return runner.model(ids64, meta.positions,
                        PagedContext(meta, runner.kv_view, runner.lora_views))


def warm_up_engine(runner, config) -> int:
    """The start-up warm-up of a CUDA engine (see the module docstring); logs its time and
    returns the passes run (0 elsewhere: no lazy loading to get ahead of)."""
    if runner.device.type != "cuda":
        return 0
    start = time.perf_counter()
    try:
        with torch.cuda.device(runner.device):
            preload = _C.preload_cuda_kernels()
        log.info("loaded %d of libmoelora's %d kernels (%d modules) in %.2f s",
                 preload["newly_loaded"], preload["kernels"], preload["modules"],
                 time.perf_counter() - start)
    except _C.CudaError as error:  # a driver older than CUDA 12.4: kernels load on first use
        log.warning("kernels load on first use: %s", error)
    graphs = runner.graphs
    largest = graphs.buckets[-1] if graphs is not None and graphs.capture else None
    sizes = eager_step_sizes(config.max_num_batched_tokens, largest)
    counts = adapter_counts(runner.lora_views is not None, config.max_loras_per_batch)
    start = time.perf_counter()
    passes = warm_up_eager_steps(runner, sizes, counts, config.max_num_seqs)
    torch.cuda.synchronize(runner.device)
    log.info("warmed up %d eager passes (steps of %s tokens) in %.2f s", passes,
             " and ".join(map(str, sizes)) or "no", time.perf_counter() - start)
    return passes


__all__ = ["adapter_counts", "eager_step_sizes", "warm_up_eager_steps", "warm_up_engine"]
