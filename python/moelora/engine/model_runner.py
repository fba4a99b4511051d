"""Runs one scheduled step through the model: builds the step's metadata on the host, copies
it to the device once, runs the forward pass in a PagedContext and returns the logits of the
sequences that sample a token this step."""

from __future__ import annotations

import torch
from moelora.engine.paged_context import PagedContext, StepMetadata
from moelora.engine.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model, kv_view, lora_views, block_tokens: int, device: torch.device):
        self.model = model
        self.kv_view = kv_view
        self.lora_views = lora_views
        self.block_tokens = block_tokens
        self.device = device
        self.num_layers = model.config.num_layers

    def build_metadata(self, batch: ScheduledBatch, slot_of: dict[int, int]):
        input_ids: list[int] = []
        positions: list[int] = []
        query_seq: list[int] = []
        token_slot: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        slot_mapping_parts: list[torch.Tensor] = []
        max_blocks = max(len(seq.block_pages) for seq in batch.seqs)
        block_tables = torch.zeros(self.num_layers, len(batch.seqs), max(max_blocks, 1),
                                   dtype=torch.int32)
        any_adapter = False
        for index, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            tokens = seq.all_token_ids[start:start + num_new]
            slot = slot_of.get(seq.seq_id, -1) if seq.adapter_id is not None else -1
            any_adapter |= slot >= 0
            input_ids.extend(tokens)
            positions.extend(range(start, start + num_new))
            query_seq.extend([index] * num_new)
            token_slot.extend([slot] * num_new)
            seq_lens.append(start + num_new)
            if start + num_new == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
            pages = torch.tensor(seq.block_pages, dtype=torch.int64).reshape(-1, self.num_layers)
            block_tables[:, index, : pages.shape[0]] = pages.t().to(torch.int32)
            new_positions = torch.arange(start, start + num_new)
            token_pages = pages[new_positions // self.block_tokens]  # [num_new, L]
            slot_mapping_parts.append(token_pages * self.block_tokens
                                      + (new_positions % self.block_tokens)[:, None])
        dev = self.device
        positions_on_device = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        meta = StepMetadata(
            positions=positions_on_device,
            query_pos=positions_on_device.to(torch.int32),
            query_seq=torch.tensor(query_seq, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=block_tables.to(dev, non_blocking=True),
            slot_mapping=torch.cat(slot_mapping_parts).t().contiguous().to(dev, non_blocking=True),
            token_slot=(torch.tensor(token_slot, dtype=torch.int32).to(dev, non_blocking=True)
                        if any_adapter else None),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, meta, sample_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, slot_of: dict[int, int]) -> torch.Tensor:
        """Returns float32 logits [number of sampling sequences, vocab]."""
        input_ids, meta, sample_rows = self.build_metadata(batch, slot_of)
        ctx = PagedContext(meta, self.kv_view, self.lora_views)
        hidden = self.model(input_ids, meta.positions, ctx)
        if not sample_rows:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()
