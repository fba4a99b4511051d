"""Steps of up to a bucket's tokens replayed from CUDA graphs: pure decode, and prefill chunks
beside decodes.

A step of a MoE model launches hundreds of small kernels from Python; on the GPU a step of a few
hundred tokens or fewer is bound by that host work, not by the GPU. StepGraphs keeps, per padded
token count (a bucket), a CUDA graph of the whole forward pass, from the step's int32 inputs to
the final hidden states. Every token is a query of its own (its block-table row and position):
the paged attention kernel serves decode tokens and prefill tokens alike (causal by position),
so a step that mixes a new prompt with decoding sequences replays the same graph as a decode
step of as many tokens. The graphs read the runner's buffers directly: the step's arrays land in
`inputs` (the runner's one host-to-device copy goes there), the block tables are the runner's
persistent BlockTable, and expanding the arrays (int64 ids and positions, every layer's KV slots)
is part of the captured work. Each bucket has two graphs: one with the LoRA kernels, replayed
when some token has an adapter, and one without (ctx.token_slot None), so steps without adapters
launch no LoRA kernel and the MoE takes its fused LoRA-free form. On a GPU every bucket's
graphs are captured when the engine starts (capture_all, largest first, as vLLM does), so no
step pays a capture; graphs dropped later (block tables reallocated) are captured again on a
bucket's first use.

Padding tokens decode a dummy token that touches nothing: they use the block table's padding row
(all zeros, seq_len 1: they attend to one key of page 0, whatever it holds), write no KV (slot
-1) and take no LoRA (slot -1); their outputs are dropped. Every op in the forward pass has fixed
shapes for a fixed bucket and no host synchronisation, so it can be captured.

On the CPU (no graphs) the same padded path runs eagerly: the tests check it against the
unpadded engine, so the padding semantics are proven where the tests run. (The prompt tokens
of a padded step take the paged kernel there, as on a GPU; the eager CPU engine gives them
SDPA.)

Captures and adapter loads share the process. A capture runs in CUDA's thread-local mode (other
threads' calls neither fail nor break it) inside a native GraphCaptureScope (on this thread no
copy-engine or adapter-cache call may synchronise, and pinned host memory freed meanwhile waits
for the end of the capture), with Python's garbage collector paused so that no finalizer of
another engine runs CUDA frees inside the capture.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch
from moelora import _C
from moelora.engine.block_table import BlockTable
from moelora.engine.paged_context import PagedContext, StepMetadata
from moelora.engine.step_inputs import step_metadata

log = logging.getLogger("moelora")


def default_buckets(max_num_seqs: int, max_tokens: int | None = None) -> list[int]:
    """Token counts with a graph: 1, 2, 4, 8, every multiple of 16 up to max_num_seqs and
    max_num_seqs itself (decode steps), then every multiple of 32 up to max_tokens (steps with
    prefill tokens). None: max_num_seqs. Sizes above max_tokens are dropped; max_tokens itself
    is a bucket."""
    limit = max_num_seqs if max_tokens is None else max_tokens
    sizes = {b for b in (1, 2, 4, 8) if b <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    sizes.update(range(32 * (max_num_seqs // 32 + 1), limit + 1, 32))
    sizes = {b for b in sizes if b <= limit}
    sizes.add(limit)
    return sorted(sizes)


@dataclass
class _Graph:
    size: int
    lora: bool
    hidden: torch.Tensor | None = None  # the captured output [size, H]
    graph: torch.cuda.CUDAGraph | None = None


class StepGraphs:
    def __init__(self, model, kv_view, lora_views, num_layers: int, block_tokens: int,
                 max_blocks: int, buckets: list[int], device: torch.device):
        self.model = model
        self.kv_view = kv_view
        self.lora_views = lora_views
        self.num_layers = num_layers
        self.block_tokens = block_tokens
        self.max_blocks = max_blocks  # block-table width the graphs are captured with
        self.buckets = sorted(buckets)
        self.device = device
        self.capture = device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._made: dict[tuple[int, bool], _Graph | None] = {}  # None once closed
        self.replays = 0
        self.capture_error: str | None = None  # why capturing was given up, if it was
        self.tables: BlockTable | None = None  # the runner's, set by attach()
        self.inputs: torch.Tensor | None = None  # int32: a step's staged arrays, bucket layout
        self._generation = -1

    def attach(self, tables: BlockTable) -> None:
        """Reads `tables` from now on (the runner's). Graphs captured over other tables, or
        over these before they were reallocated, are dropped and captured again when used."""
        if tables is self.tables and tables.generation == self._generation:
            return
        if any(g is not None and g.graph is not None for g in self._made.values()):
            log.info("block tables reallocated: step graphs are captured again")
        self._made = {}
        self.tables, self._generation = tables, tables.generation
        # room for the largest bucket's arrays and, after them, a step's other arrays: table
        # writes (two entries per new block and layer; a step's tokens start at most one block
        # each, though a fresh row's cached prefix can need more: prepare() runs such a step
        # eagerly), feed (two per sequence) and sampled rows (prompt-logprob rows included)
        largest = self.buckets[-1]
        self.capacity = (self.prefix_size(largest) + 2 * largest * (self.num_layers + 2)
                         + 4 * largest + 64)
        self.inputs = torch.zeros(self.capacity, dtype=torch.int32, device=self.device)

    @property
    def closed(self) -> bool:
        return self.model is None

    def prefix_size(self, size: int) -> int:
        """int32 entries a bucket's graph reads from the front of `inputs`: ids, positions, rows,
        adapter slots (size each), then seq_lens (one per table row)."""
        return 4 * size + self.tables.rows + 1

    def fits(self, num_tokens: int, block_table_width: int) -> bool:
        return num_tokens <= self.buckets[-1] and block_table_width <= self.max_blocks

    def bucket_for(self, num_tokens: int, block_table_width: int) -> int | None:
        """The bucket a step of num_tokens tokens replays, or None (eager)."""
        if self.closed or self.tables is None or not self.fits(num_tokens, block_table_width):
            return None
        if self.tables.generation != self._generation:
            self.attach(self.tables)
        return next(b for b in self.buckets if b >= num_tokens)

    def ensure(self, size: int, lora: bool) -> None:
        """Captures the bucket's graph if it has none yet: call before the step's arrays are
        staged into `inputs` (capturing overwrites them)."""
        key = (size, lora and self.lora_views is not None)
        if key in self._made:
            return
        made = _Graph(*key)
        if self.capture:
            try:
                self._capture(made)
            except RuntimeError as error:  # e.g. an op that syncs the host
                # (float32 MoE experts on CUDA loop over experts on the host)
                self.capture = False
                self.capture_error = str(error).splitlines()[0]
                log.warning("step graphs disabled, steps run eagerly: capture failed: %s",
                            self.capture_error)
        self._made[key] = made

    def capture_all(self) -> None:
        """Captures every bucket's graphs, with and without LoRA, largest first (the smaller
        ones then reuse the memory pool's blocks). Only where graphs are captured (a GPU, tables
        attached); elsewhere buckets are made on first use."""
        if not self.capture or self.tables is None:
            return
        start = time.perf_counter()
        kinds = (False, True) if self.lora_views is not None else (False,)
        for size in reversed(self.buckets):
            for lora in kinds:
                self.ensure(size, lora)
                if not self.capture:  # a capture failed: steps run eagerly (logged)
                    return
        log.info("captured %d step graphs (%d buckets up to %d tokens) in %.2f s",
                 len(self._made), len(self.buckets), self.buckets[-1],
                 time.perf_counter() - start)

    def replay(self, size: int, lora: bool) -> torch.Tensor:
        """Final hidden states [size, H] of the step staged in `inputs` (ensure() first)."""
        made = self._made[(size, lora and self.lora_views is not None)]
        if made.graph is not None:
            made.graph.replay()
            self.replays += 1
            return made.hidden
        return self._forward(made)

    def run_meta(self, ids: torch.Tensor, meta: StepMetadata) -> torch.Tensor | None:
        """Final hidden states [n, H] of a pure-decode step whose metadata another runner built
        (a parallel engine's rank 0 builds it, every rank replays it): its arrays and block
        tables are copied into this one's buffers. None when they do not fit (run it eagerly)."""
        n, (_, rows, width) = ids.shape[0], meta.block_tables.shape
        size = self.bucket_for(n, width)
        if size is None or rows > self.tables.rows + 1:
            return None
        lora = meta.token_slot is not None
        self.ensure(size, lora)
        table = self.tables.table
        table[:, :rows, :width].copy_(meta.block_tables)
        ids32, positions, query_rows, slots, seq_lens = self._views(size)
        padding = self.tables.padding_row
        for static, value, fill in ((ids32, ids, 0), (positions, meta.query_pos, 0),
                                    (query_rows, meta.query_seq, padding),
                                    (slots, meta.token_slot, -1)):
            if value is None:
                static.fill_(fill)
                continue
            static[:n].copy_(value)
            static[n:].fill_(fill)
        seq_lens.zero_()
        seq_lens[:meta.seq_lens.shape[0]].copy_(meta.seq_lens)
        seq_lens[padding] = 1
        return self.replay(size, lora)[:n]

    # -- capture -----------------------------------------------------------------------------
    def _views(self, size: int) -> list[torch.Tensor]:
        ends = [size, 2 * size, 3 * size, 4 * size, self.prefix_size(size)]
        return [self.inputs[start:end] for start, end in zip([0] + ends[:-1], ends)]

    def _forward(self, made: _Graph) -> torch.Tensor:
        ids32, positions, rows, slots, seq_lens = self._views(made.size)
        ids, meta = step_metadata(ids32, positions, rows, slots if made.lora else None, seq_lens,
                                  self.tables.table[:, :, :self.max_blocks], self.block_tokens,
                                  padding_row=self.tables.padding_row, num_seqs=made.size)
        # A fresh context per pass: a PagedContext caches per-step groupings.
        return self.model(ids, meta.positions, PagedContext(meta, self.kv_view, self.lora_views))

    def _fill_padding(self, size: int) -> None:
        """Every row a padding row: capturing runs the pass, and it must touch nothing."""
        ids32, positions, rows, slots, seq_lens = self._views(size)
        ids32.zero_()
        positions.zero_()
        rows.fill_(self.tables.padding_row)
        slots.fill_(-1)
        seq_lens.zero_()
        seq_lens[self.tables.padding_row] = 1

    def _capture(self, made: _Graph) -> None:
        self._fill_padding(made.size)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: lazy inits, kernel attributes, allocator
            for _ in range(2):
                self._forward(made)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()
        try:
            with _C.GraphCaptureScope(), torch.cuda.graph(graph, pool=self._pool,
                                                          capture_error_mode="thread_local"):
                made.hidden = self._forward(made)
        finally:
            if collecting:
                gc.enable()
        made.graph = graph

    def close(self) -> None:
        """Frees the graphs, their memory pool and the buffers (the keys of the graphs that were
        made stay listed, as does the replay count)."""
        self._made = dict.fromkeys(self._made)
        self._pool = None
        self.capture = False
        self.model = self.kv_view = self.lora_views = None
        self.tables = self.inputs = None
