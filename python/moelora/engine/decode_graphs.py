"""Pure-decode steps (one new token per sequence) replayed from CUDA graphs.

A decode step of a MoE model launches hundreds of small kernels from Python; on the GPU the
step is bound by that host work, not by the GPU. A DecodeGraphs keeps, per padded batch size
(a bucket), static input buffers and a CUDA graph of the whole forward pass captured over them;
a step copies its metadata into the buffers of the smallest bucket that holds it and replays.

Padding rows decode a dummy token that touches nothing: slot_mapping -1 (no KV write),
token_slot -1 (no LoRA), seq_len 1 over an all-zero block-table row (they attend to one key of
page 0, whatever it holds, and only to it); their outputs are dropped. Every op in the forward
pass has fixed shapes for a fixed bucket and no host synchronisation, so it can be captured.

On the CPU (no graphs) the same padded path runs eagerly: the tests check it against the
unpadded engine, so the padding semantics are proven where the tests run.

Captures and adapter loads share the process. A capture runs in CUDA's thread-local mode (other
threads' calls neither fail nor break it) inside a native GraphCaptureScope (on this thread no
copy-engine or adapter-cache call may synchronise, and pinned host memory freed meanwhile waits
for the end of the capture), with Python's garbage collector paused so that no finalizer of
another engine runs CUDA frees inside the capture.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch
from moelora import _C
from moelora.engine.paged_context import PagedContext, StepMetadata

log = logging.getLogger("moelora")


def default_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


@dataclass
class _Bucket:
    size: int
    ids: torch.Tensor  # int64 [B]
    meta: StepMetadata  # static tensors the captured graph reads
    hidden: torch.Tensor | None = None  # the captured output [B, H]
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
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
        self._made: dict[int, _Bucket | None] = {}  # None once closed
        self.replays = 0
        self.capture_error: str | None = None  # why capturing was given up, if it was

    def fits(self, num_seqs: int, block_table_width: int) -> bool:
        return num_seqs <= self.buckets[-1] and block_table_width <= self.max_blocks

    def run(self, ids: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """Final hidden states [n, H] of a pure-decode step of n sequences (ids/meta as built by
        ModelRunner.build_metadata, one token per sequence)."""
        n = ids.shape[0]
        bucket = self._bucket(next(b for b in self.buckets if b >= n))
        self._fill(bucket, ids, meta)
        if bucket.graph is not None:
            bucket.graph.replay()
            self.replays += 1
            return bucket.hidden[:n]
        return self._forward(bucket)[:n]

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        # A fresh context per pass: a PagedContext caches per-step groupings.
        ctx = PagedContext(bucket.meta, self.kv_view, self.lora_views)
        return self.model(bucket.ids, bucket.meta.positions, ctx)

    # -- static buffers ----------------------------------------------------------------------
    def _bucket(self, size: int) -> _Bucket:
        bucket = self._made.get(size)
        if bucket is None:
            bucket = self._new_bucket(size)
            if self.capture:
                try:
                    self._capture(bucket)
                except RuntimeError as error:  # e.g. an op that syncs the host
                    # (float32 MoE experts on CUDA loop over experts on the host)
                    self.capture = False
                    self.capture_error = str(error).splitlines()[0]
                    log.warning("decode graphs disabled, steps run eagerly: capture failed: %s",
                                self.capture_error)
            self._made[size] = bucket
        return bucket

    def _new_bucket(self, size: int) -> _Bucket:
        dev = self.device
        positions = torch.zeros(size, dtype=torch.int64, device=dev)
        meta = StepMetadata(
            positions=positions,
            query_pos=torch.zeros(size, dtype=torch.int32, device=dev),
            query_seq=torch.arange(size, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(size, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(self.num_layers, size, self.max_blocks, dtype=torch.int32,
                                     device=dev),
            slot_mapping=torch.full((self.num_layers, size), -1, dtype=torch.int64, device=dev),
            # always a tensor when LoRA is on, so the LoRA launches are part of every graph
            token_slot=(torch.full((size,), -1, dtype=torch.int32, device=dev)
                        if self.lora_views is not None else None),
        )
        ids = torch.zeros(size, dtype=torch.int64, device=dev)
        return _Bucket(size, ids, meta)

    def _fill(self, bucket: _Bucket, ids: torch.Tensor, meta: StepMetadata) -> None:
        n, static = ids.shape[0], bucket.meta
        width = meta.block_tables.shape[2]
        bucket.ids[:n].copy_(ids)
        bucket.ids[n:].zero_()
        static.positions[:n].copy_(meta.positions)
        static.positions[n:].zero_()
        static.query_pos[:n].copy_(meta.query_pos)
        static.query_pos[n:].zero_()
        static.seq_lens[:n].copy_(meta.seq_lens)
        static.seq_lens[n:].fill_(1)
        static.block_tables.zero_()
        static.block_tables[:, :n, :width].copy_(meta.block_tables)
        static.slot_mapping[:, :n].copy_(meta.slot_mapping)
        static.slot_mapping[:, n:].fill_(-1)
        if static.token_slot is not None:
            if meta.token_slot is None:
                static.token_slot.fill_(-1)
            else:
                static.token_slot[:n].copy_(meta.token_slot)
                static.token_slot[n:].fill_(-1)

    def _capture(self, bucket: _Bucket) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: lazy inits, kernel attributes, allocator
            for _ in range(2):
                self._forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()
        try:
            with _C.GraphCaptureScope(), torch.cuda.graph(graph, pool=self._pool,
                                                          capture_error_mode="thread_local"):
                bucket.hidden = self._forward(bucket)
        finally:
            if collecting:
                gc.enable()
        bucket.graph = graph

    def close(self) -> None:
        """Frees the graphs, their memory pool and the static buffers (the bucket sizes that
        were made stay listed, as does the replay count)."""
        self._made = dict.fromkeys(self._made)
        self._pool = None
        self.capture = False
        self.model = self.kv_view = self.lora_views = None
