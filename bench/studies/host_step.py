"""Host work of one decode step, before and after keeping block tables on the device, in one run.

    PYTHONPATH=python python3 bench/studies/host_step.py --seqs 64 --tokens 512 --layers 48

Steady-state decode of `--seqs` sequences of `--tokens` tokens (one new token each per step, a
new block every block_size tokens), three measurements per step, medians over `--steps`:

- rebuild: the step metadata rebuilt from the sequences' nested page lists ([layers, seqs,
  blocks] block tables and [layers, tokens] slot mappings made on the host, then copied), the
  engine's former build_metadata, kept here as the baseline;
- delta: ModelRunner.prepare (rows, the table entries of new blocks, token arrays, one staged
  copy) plus, timed apart, the table writes and the metadata expansion that a GPU runs as kernels
  (inside the decode graph for graph steps) and this CPU runs inline;
- detokenize: the output text of every sequence after its new token, decoded in full (the former
  rule) and incrementally (engine/detokenizer.py), with the demo's byte-level tokenizer.

One JSON line per run on stdout. No GPU needed; with --device cuda the delta path stages into
device memory (the copy and expansion are then asynchronous and not in the host time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
from moelora.demo.assets import _write_tokenizer
from moelora.engine.detokenizer import IncrementalDetokenizer
from moelora.engine.model_runner import ModelRunner
from moelora.engine.request import Sequence
from moelora.engine.sampling_params import SamplingParams
from moelora.engine.scheduler import ScheduledBatch
from moelora.engine.tokenizer import load_tokenizer


def rebuild_metadata(batch: ScheduledBatch, num_layers: int, block_tokens: int, device):
    """The former per-step build: every block table entry of every sequence from Python lists."""
    input_ids, positions, query_seq, seq_lens, page_rows = [], [], [], [], []
    max_blocks = max(1, max(len(seq.block_pages) for seq in batch.seqs))
    no_block = [0] * num_layers
    for index, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start = seq.num_computed_tokens
        input_ids.extend(seq.token_ids(start, start + num_new))
        positions.extend(range(start, start + num_new))
        query_seq.extend([index] * num_new)
        seq_lens.append(start + num_new)
        page_rows.append(seq.block_pages + [no_block] * (max_blocks - len(seq.block_pages)))
    pages = torch.tensor(page_rows, dtype=torch.int64)
    block_tables = pages.permute(2, 0, 1).to(torch.int32)
    positions_cpu = torch.tensor(positions, dtype=torch.int64)
    seq_of_token = torch.tensor(query_seq, dtype=torch.int64)
    token_pages = pages[seq_of_token, positions_cpu // block_tokens]
    slot_mapping = token_pages * block_tokens + (positions_cpu % block_tokens)[:, None]
    return (torch.tensor(input_ids).to(device), block_tables.contiguous().to(device),
            slot_mapping.t().contiguous().to(device),
            torch.tensor(seq_lens, dtype=torch.int32).to(device))


class Decode:
    """Sequences decoding one token per step, pages handed out as blocks fill."""

    def __init__(self, seqs: int, tokens: int, layers: int, block_tokens: int, vocab: int):
        self.layers, self.block_tokens, self.vocab = layers, block_tokens, vocab
        self.next_page = 0
        self.seqs = []
        for i in range(seqs):
            seq = Sequence(seq_id=i, request_id=str(i), index=0,
                           prompt_token_ids=[(7 * i + j) % vocab for j in range(tokens)],
                           params=SamplingParams(), adapter_id=None, arrival_time=0.0)
            seq.num_computed_tokens = tokens - 1
            self._grow(seq, tokens)
            self.seqs.append(seq)

    def _grow(self, seq: Sequence, total: int) -> None:
        while len(seq.block_pages) * self.block_tokens < total:
            seq.block_pages.append(list(range(self.next_page, self.next_page + self.layers)))
            self.next_page += self.layers

    def batch(self) -> ScheduledBatch:
        return ScheduledBatch(list(self.seqs), [1] * len(self.seqs))

    def advance(self, step: int) -> None:
        for seq in self.seqs:
            seq.num_computed_tokens += 1
            seq.output_token_ids.append((step * 31 + seq.seq_id * 17) % self.vocab)
            self._grow(seq, seq.num_tokens + 1)


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as directory:
        vocab = _write_tokenizer(directory)
        tokenizer = load_tokenizer(directory)

    old, new, expand, full, incremental = [], [], [], [], []
    work = Decode(args.seqs, args.tokens, args.layers, args.block_size, vocab)
    model = SimpleNamespace(config=SimpleNamespace(num_layers=args.layers))
    runner = ModelRunner(model, None, None, args.block_size, device, max_rows=args.seqs)
    detoks = [IncrementalDetokenizer(tokenizer) for _ in work.seqs]
    for step in range(args.steps):
        batch = work.batch()
        start = time.perf_counter()
        rebuild_metadata(batch, args.layers, args.block_size, device)
        old.append(time.perf_counter() - start)
        start = time.perf_counter()
        prepared = runner.prepare(batch, {})
        new.append(time.perf_counter() - start)
        start = time.perf_counter()
        runner.tables.apply(*prepared.writes)
        runner._metadata(prepared)
        if device.type == "cuda":
            torch.cuda.synchronize()
        expand.append(time.perf_counter() - start)
        work.advance(step)
        start = time.perf_counter()
        for seq in work.seqs:
            tokenizer.decode(seq.output_token_ids)
        full.append(time.perf_counter() - start)
        start = time.perf_counter()
        for seq, detok in zip(work.seqs, detoks):
            detok.add(seq.output_token_ids)
        incremental.append(time.perf_counter() - start)
    # the detokenisation rows above decode outputs of 1..steps tokens; at --tokens outputs:
    long_outputs = [[(7 * i + j) % vocab for j in range(args.tokens)] for i in range(args.seqs)]
    start = time.perf_counter()
    for ids in long_outputs:
        tokenizer.decode(ids)
    full_at_length = time.perf_counter() - start
    print(json.dumps({
        "bench": "host_step", "device": args.device, "seqs": args.seqs, "tokens": args.tokens,
        "layers": args.layers, "block_size": args.block_size, "steps": args.steps,
        "rebuild_ms": _median_ms(old), "delta_prepare_ms": _median_ms(new),
        "delta_expand_ms": _median_ms(expand),
        "detok_full_ms_at_tokens": round(full_at_length * 1e3, 3),
        "detok_full_ms_short": _median_ms(full), "detok_incremental_ms": _median_ms(incremental),
    }))


if __name__ == "__main__":
    main()
