"""Runs one scheduled step through the model: builds the step's metadata on the host, copies
it to the device once, runs the forward pass in a PagedContext and returns the logits of the
sequences that sample a token this step."""

from __future__ import annotations

import torch
from moelora.engine.paged_context import PagedContext, StepMetadata
from moelora.engine.prefill_attention import MAX_GATHERED_KEYS, PrefillSpan
from moelora.engine.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model, kv_view, lora_views, block_tokens: int, device: torch.device,
                 graphs=None):
        self.model = model
        self.kv_view = kv_view
        self.lora_views = lora_views
        self.block_tokens = block_tokens
        self.device = device
        self.num_layers = model.config.num_layers
        self.graphs = graphs  # DecodeGraphs, or None: every step runs eagerly

    def build_metadata(self, batch: ScheduledBatch, slot_of: dict[int, int]):
        input_ids: list[int] = []
        positions: list[int] = []
        query_seq: list[int] = []
        token_slot: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        page_rows: list[list[list[int]]] = []  # per sequence: its pages [block][layer], padded
        max_blocks = max(1, max(len(seq.block_pages) for seq in batch.seqs))
        no_block = [0] * self.num_layers
        slots_used: set[int] = set()
        spans: list[PrefillSpan] = []
        paged_tokens: list[int] = []
        for index, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            tokens = seq.token_ids(start, start + num_new)
            slot = slot_of.get(seq.seq_id, -1) if seq.adapter_id is not None else -1
            if slot >= 0:
                slots_used.add(slot)
            if num_new >= 2 and start <= MAX_GATHERED_KEYS:
                spans.append(PrefillSpan(len(input_ids), num_new, index, start))
            else:
                paged_tokens.extend(range(len(input_ids), len(input_ids) + num_new))
            input_ids.extend(tokens)
            positions.extend(range(start, start + num_new))
            query_seq.extend([index] * num_new)
            token_slot.extend([slot] * num_new)
            seq_lens.append(start + num_new)
            if start + num_new == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
            page_rows.append(seq.block_pages + [no_block] * (max_blocks - len(seq.block_pages)))
        # One tensor build and one gather for the whole step (per-sequence tensor ops cost
        # ~10 us each, milliseconds per step at 100+ sequences).
        pages = torch.tensor(page_rows, dtype=torch.int64)  # [S, max_blocks, L]
        block_tables = pages.permute(2, 0, 1).to(torch.int32)  # [L, S, max_blocks]
        positions_cpu = torch.tensor(positions, dtype=torch.int64)
        seq_of_token = torch.tensor(query_seq, dtype=torch.int64)
        token_pages = pages[seq_of_token, positions_cpu // self.block_tokens]  # [T, L]
        slot_mapping = token_pages * self.block_tokens + (positions_cpu % self.block_tokens)[:, None]
        dev = self.device
        positions_on_device = positions_cpu.to(dev, non_blocking=True)
        meta = StepMetadata(
            positions=positions_on_device,
            query_pos=positions_on_device.to(torch.int32),
            query_seq=seq_of_token.to(torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=block_tables.contiguous().to(dev, non_blocking=True),
            slot_mapping=slot_mapping.t().contiguous().to(dev, non_blocking=True),
            token_slot=(torch.tensor(token_slot, dtype=torch.int32).to(dev, non_blocking=True)
                        if slots_used else None),
            num_adapters=len(slots_used),
            prefill_spans=tuple(spans),
            paged_tokens=(torch.tensor(paged_tokens, dtype=torch.int64).to(dev, non_blocking=True)
                          if spans else None),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, meta, sample_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, slot_of: dict[int, int]) -> torch.Tensor:
        """Returns float32 logits [number of sampling sequences, vocab]."""
        input_ids, meta, sample_rows = self.build_metadata(batch, slot_of)
        if (self.graphs is not None and all(n == 1 for n in batch.num_new_tokens)
                and self.graphs.fits(len(batch.seqs), meta.block_tables.shape[2])):
            hidden = self.graphs.run(input_ids, meta)  # a pure-decode step: replay
        else:
            hidden = self.model(input_ids, meta.positions,
                                PagedContext(meta, self.kv_view, self.lora_views))
        if not sample_rows:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()
