"""Runs one scheduled step through the model.

`prepare` builds the step on the host: each sequence's block-table row and the table entries its
new blocks need (engine/block_table.py), token ids, positions, adapter slots, seq_lens, the rows
to sample; then sends them to the device in one copy (engine/step_inputs.py). `forward` writes the
table entries, fills in the ids of pending tokens from the previous step's sampled tokens (async
scheduling: the host does not have them yet), and replays a step graph (a step whose tokens
fit one of its buckets, decode and prefill tokens alike) or runs the model eagerly; it returns the hidden states of the sampled rows, then of the
rows whose logits give prompt logprobs (engine/prompt_logprobs.py). Nothing in prepare or forward
waits for the GPU. `execute` does both and returns the logits.
"""

from __future__ import annotations

import numpy as np
import torch
from moelora.engine.block_table import BlockTable, TableWrites
from moelora.engine.paged_context import PagedContext, StepMetadata
from moelora.engine.prefill_attention import MAX_GATHERED_KEYS, PrefillSpan
from moelora.engine.prompt_logprobs import prompt_logprob_span
from moelora.engine.scheduler import ScheduledBatch
from moelora.engine.step_inputs import HostStep, PreparedStep, send, step_metadata

# Block tables of a runner not told its row count (max_rows) or without step graphs (their
# width): rows grow with the sequences running at once; blocks past the width go to the
# overflow table.
DEFAULT_ROWS = 16
DEFAULT_WIDTH = 64


class ModelRunner:
    def __init__(self, model, kv_view, lora_views, block_tokens: int, device: torch.device,
                 graphs=None, max_rows: int | None = None):
        self.model = model
        self.kv_view = kv_view
        self.lora_views = lora_views
        self.block_tokens = block_tokens
        self.device = device
        self.num_layers = model.config.num_layers
        self.graphs = graphs  # StepGraphs, or None: every step runs eagerly
        rows = max_rows or DEFAULT_ROWS
        width = graphs.max_blocks if graphs is not None else DEFAULT_WIDTH
        self.tables = BlockTable(self.num_layers, rows, width, device)
        if graphs is not None:
            graphs.attach(self.tables)

    def release(self) -> None:
        """Drops the model and the pool's views and frees the step graphs (their counters stay
        readable); runners this one wraps are released too. The runner runs nothing after."""
        if self.graphs is not None:
            self.graphs.close()
        self.model = self.kv_view = self.lora_views = self.tables = None
        for value in vars(self).values():
            if isinstance(value, ModelRunner):
                value.release()

    # -- host --------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch, slot_of: dict[int, int],
                pending: dict[int, int] | None = None, eager: bool = False) -> PreparedStep:
        """The step on the device. `pending`: seq_id -> index, in the previous step's sampled
        tokens, of a sequence's pending token (forward() takes its id from there)."""
        host, writes = self._host_step(batch, slot_of, pending)
        num_tokens, lora = len(host.ids), host.slots is not None
        tail = [*writes.arrays(), host.feed_dst, host.feed_src, host.sample_rows]
        bucket = None
        if self.graphs is not None and not eager:
            bucket = self.graphs.bucket_for(num_tokens, host.width)
            if bucket is not None and (self.graphs.prefix_size(bucket)
                                       + sum(len(t) for t in tail) > self.graphs.capacity):
                bucket = None  # an unusual step (many new table entries): eager
        target = None
        if bucket is not None:
            self.graphs.ensure(bucket, lora)  # before staging: a capture overwrites the inputs
            host.pad(bucket, self.tables.padding_row)
            target = self.graphs.inputs
        parts = [host.ids, host.positions, host.rows]
        parts += [host.slots] if host.slots is not None else []
        parts += [host.seq_lens, *tail]
        parts += [host.paged_tokens()] if host.spans else []
        views = send(parts, self.device, target)
        ids, positions, rows = views[:3]
        slots = views[3] if host.slots is not None else None
        rest = views[4:] if host.slots is not None else views[3:]
        seq_lens, writes_on_device, (feed_dst, feed_src, sample_rows) = \
            rest[0], tuple(rest[1:5]), rest[5:8]
        return PreparedStep(
            num_seqs=host.num_seqs, num_tokens=num_tokens, bucket=bucket, lora=lora,
            num_adapters=host.num_adapters, width=host.width, ids=ids, positions=positions,
            rows=rows, slots=slots if lora else None, seq_lens=seq_lens,
            writes=writes_on_device, feed_dst=feed_dst, feed_src=feed_src,
            sample_rows=sample_rows, num_sample=len(host.sample_rows),
            samples_every_token=(len(host.sample_rows) == num_tokens
                                 and host.sample_rows == list(range(num_tokens))),
            spans=host.spans,
            paged_tokens=rest[8].long() if host.spans else None)

    def _host_step(self, batch: ScheduledBatch, slot_of: dict[int, int],
                   pending: dict[int, int] | None) -> tuple[HostStep, TableWrites]:
        rows, writes = self.tables.collect(batch.seqs)
        seq_lens = np.zeros(self.tables.rows + 1, dtype=np.int32)
        seq_lens[self.tables.padding_row] = 1
        ids: list[int] = []
        positions: list[int] = []
        token_rows: list[int] = []
        token_slots: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[int] = []  # after the sampled rows: rows scoring prompt tokens
        feed_dst: list[int] = []
        feed_src: list[int] = []
        spans: list[PrefillSpan] = []
        slots_used: set[int] = set()
        for seq, num_new, row in zip(batch.seqs, batch.num_new_tokens, rows):
            start = seq.num_computed_tokens
            tokens = seq.token_ids(start, start + num_new)
            if len(tokens) < num_new:  # the step reaches the sequence's pending token
                if (pending is None or seq.seq_id not in pending
                        or len(tokens) != num_new - 1 or seq.num_pending_tokens != 1):
                    raise RuntimeError(f"sequence {seq.seq_id}: the step needs tokens the "
                                       f"host does not have and no step in flight samples")
                feed_dst.append(len(ids) + len(tokens))
                feed_src.append(pending[seq.seq_id])
                tokens = [*tokens, 0]
            slot = slot_of.get(seq.seq_id, -1) if seq.adapter_id is not None else -1
            if slot >= 0:
                slots_used.add(slot)
            if num_new >= 2 and start <= MAX_GATHERED_KEYS:
                spans.append(PrefillSpan(len(ids), num_new, row, start))
            ids.extend(tokens)
            positions.extend(range(start, start + num_new))
            token_rows.extend([row] * num_new)
            token_slots.extend([slot] * num_new)
            seq_lens[row] = start + num_new
            if start + num_new == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
            span = prompt_logprob_span(seq, start, num_new)
            if span is not None:
                offset = len(ids) - num_new - start
                prompt_rows.extend(range(offset + span[0], offset + span[1]))
        width = max(1, max(len(seq.block_pages) for seq in batch.seqs))
        return HostStep(ids=ids, positions=positions, rows=token_rows,
                        slots=token_slots if slots_used else None, seq_lens=seq_lens,
                        sample_rows=sample_rows + prompt_rows, feed_dst=feed_dst,
                        feed_src=feed_src,
                        spans=tuple(spans), num_seqs=len(batch.seqs),
                        num_adapters=len(slots_used), width=width), writes

    # -- device ------------------------------------------------------------------------------
    def forward(self, step: PreparedStep, previous_tokens: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Hidden states [step.num_sample, H] of the sampled rows, then the prompt-logprob
        rows. previous_tokens: int64 sampled tokens of the step before (for step.feed_*)."""
        self.tables.apply(*step.writes)
        if step.feed_dst.numel():
            step.ids.index_copy_(0, step.feed_dst.long(),
                                 previous_tokens.index_select(0, step.feed_src).to(torch.int32))
        if step.bucket is not None:
            hidden = self.graphs.replay(step.bucket, step.lora)[:step.num_tokens]
        else:
            ids, meta = self._metadata(step)
            hidden = self.model(ids, meta.positions,
                                PagedContext(meta, self.kv_view, self.lora_views))
        if step.samples_every_token:
            return hidden
        return hidden.index_select(0, step.sample_rows)

    def _metadata(self, step: PreparedStep) -> tuple[torch.Tensor, StepMetadata]:
        return step_metadata(step.ids, step.positions, step.rows, step.slots, step.seq_lens,
                             self.tables.view(step.width), self.block_tokens,
                             num_adapters=step.num_adapters, num_seqs=step.num_seqs,
                             spans=step.spans, paged_tokens=step.paged_tokens)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab] of sampled rows' hidden states."""
        if hidden.shape[0] == 0:
            return torch.empty(0, self.model.config.vocab_size, device=hidden.device)
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, slot_of: dict[int, int]) -> torch.Tensor:
        """Returns float32 logits [sampling sequences + prompt-logprob rows, vocab]: one row
        per sampling sequence, in batch order, then the rows of prompt_logprob_span's spans."""
        return self.logits(self.forward(self.prepare(batch, slot_of)))

    # -- metadata for another runner (a parallel engine's rank 0 builds, every rank runs) -----
    def build_metadata(self, batch: ScheduledBatch, slot_of: dict[int, int]):
        """(int64 ids, StepMetadata, sampled rows) of a step, self-contained (copies, not views
        of this runner's buffers), for run_model on any runner."""
        step = self.prepare(batch, slot_of, eager=True)
        self.tables.apply(*step.writes)
        ids, meta = self._metadata(step)
        return ids.clone(), meta.compact(), step.sample_rows.tolist()

    def run_model(self, input_ids: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """Final hidden states of a step built by build_metadata: replayed from a step graph
        when every sequence has one token (pure decode) and the graphs fit the step, else an
        eager forward pass. Ranks of a parallel engine decide alike from the same metadata, so
        their collectives stay matched whether they replay (the graph holds them) or not."""
        if self.graphs is not None and input_ids.shape[0] == meta.num_seqs:
            hidden = self.graphs.run_meta(input_ids, meta)
            if hidden is not None:
                return hidden
        return self.model(input_ids, meta.positions,
                          PagedContext(meta, self.kv_view, self.lora_views))
