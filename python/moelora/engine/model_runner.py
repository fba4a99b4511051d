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

    def release(self) -> None:
        """Drops the model and the pool's views and frees the decode graphs (their counters stay
        readable); runners this one wraps are released too. The runner runs nothing after."""
        if self.graphs is not None:
            self.graphs.close()
        self.model = self.kv_view = self.lora_views = None
        for value in vars(self).values():
            if isinstance(value, ModelRunner):
                value.release()

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
        for index, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            tokens = seq.token_ids(start, start + num_new)
            slot = slot_of.get(seq.seq_id, -1) if seq.adapter_id is not None else -1
            if slot >= 0:
                slots_used.add(slot)
            if num_new >= 2 and start <= MAX_GATHERED_KEYS:
                spans.append(PrefillSpan(len(input_ids), num_new, index, start))
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
            paged_tokens=_outside(spans, len(input_ids), dev),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, meta, sample_rows

    def run_model(self, input_ids: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """Final hidden states of a step: replayed from a decode graph when every sequence has
        one token (pure decode) and the graphs fit the step, else an eager forward pass. Ranks
        of a parallel engine decide alike from the same metadata, so their collectives stay
        matched whether they replay (the graph holds them) or not."""
        if (self.graphs is not None and input_ids.shape[0] == meta.seq_lens.shape[0]
                and self.graphs.fits(input_ids.shape[0], meta.block_tables.shape[2])):
            return self.graphs.run(input_ids, meta)
        return self.model(input_ids, meta.positions,
                          PagedContext(meta, self.kv_view, self.lora_views))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, slot_of: dict[int, int]) -> torch.Tensor:
        """Returns float32 logits [number of sampling sequences, vocab]."""
        input_ids, meta, sample_rows = self.build_metadata(batch, slot_of)
        hidden = self.run_model(input_ids, meta)
        if not sample_rows:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()


def _outside(spans, num_tokens: int, device) -> torch.Tensor | None:
    """Indices of the step tokens outside the prefill spans (None without spans): built only
    for steps with a prefill, so decode steps pay nothing for it."""
    if not spans:
        return None
    outside = torch.ones(num_tokens, dtype=torch.bool)
    for span in spans:
        outside[span.first:span.first + span.count] = False
    return outside.nonzero().flatten().to(device, non_blocking=True)
