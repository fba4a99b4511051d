"""Prompt logprobs (SamplingParams.prompt_logprobs), as vLLM returns them.

The hidden state at prompt position p scores prompt token p + 1. A step that computes positions
[start, start + num_new) of a sequence asking for prompt logprobs therefore also takes the logits
of its positions below the last prompt position (the last one is the sampled row): the model
runner appends those rows after the sampled rows (`prompt_logprob_span` says which, for the runner
and the engine alike), and PromptLogprobBatch turns their logits into one dict per prompt token:
the actual token's logprob and rank, and the top k. Chunked prefill gives a sequence several such
spans, in order; a sequence asking for prompt logprobs never reuses cached prefix blocks
(KVManager.attach_cached_prefix), since a cached block has no logits. After a preemption the
positions already scored are not scored again.

The first prompt token has nothing before it: RequestOutput.prompt_logprobs starts with None.
"""

from __future__ import annotations

import torch
from moelora.engine.request import Logprob, Sequence


def prompt_logprob_span(seq: Sequence, start: int, num_new: int) -> tuple[int, int] | None:
    """Positions [first, stop) of a step's chunk [start, start + num_new) whose logits give
    prompt logprobs still missing, or None. Only the request's first sample computes them (the
    prompt is the same for all n)."""
    if seq.params.prompt_logprobs is None or seq.index != 0:
        return None
    first = max(start, len(seq.prompt_logprobs))
    stop = min(start + num_new, len(seq.prompt_token_ids) - 1)
    return (first, stop) if first < stop else None


def prompt_logprob_spans(batch) -> list[tuple[Sequence, tuple[int, int]]]:
    """(sequence, positions) of a step's prompt-logprob rows, in the order the runner takes them
    (before the step's tokens are counted as computed)."""
    spans = []
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        span = prompt_logprob_span(seq, seq.num_computed_tokens, num_new)
        if span is not None:
            spans.append((seq, span))
    return spans


class PromptLogprobBatch:
    """The prompt logprobs of one step's spans, computed on the logits' device without waiting;
    `append` brings them to the host and extends each sequence's list."""

    def __init__(self, logits: torch.Tensor, spans: list[tuple[Sequence, tuple[int, int]]]):
        """logits: float32 [sum of span lengths, vocab], the spans' rows in order."""
        self.spans = spans
        self.vocab = vocab = logits.shape[1]
        targets = [t for seq, (first, stop) in spans
                   for t in seq.prompt_token_ids[first + 1:stop + 1]]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(targets, dtype=torch.int64, device=logits.device)
        self.chosen = logprobs.gather(1, target[:, None])[:, 0]
        # vLLM's rank: how many tokens are at least as likely as the actual one
        self.ranks = (logprobs >= self.chosen[:, None]).sum(dim=1)
        self.top_k = max(_count(seq, vocab) for seq, _ in spans)
        self.top_values = self.top_ids = None
        if self.top_k:
            self.top_values, self.top_ids = torch.topk(logprobs, self.top_k, dim=-1)

    def append(self, tokenizer) -> None:
        chosen, ranks = self.chosen.tolist(), self.ranks.tolist()
        top_values = self.top_values.tolist() if self.top_k else None
        top_ids = self.top_ids.tolist() if self.top_k else None
        decoded: dict[int, str | None] = {}

        def text(token: int) -> str | None:
            if tokenizer is None:
                return None
            if token not in decoded:
                decoded[token] = tokenizer.decode([token], skip_special_tokens=False)
            return decoded[token]

        row = 0
        for seq, (first, stop) in self.spans:
            k = _count(seq, self.vocab)
            for position in range(first, stop):
                token = seq.prompt_token_ids[position + 1]
                entry = {token: Logprob(chosen[row], ranks[row], text(token))}
                for rank in range(k):
                    top = top_ids[row][rank]
                    if top not in entry:
                        entry[top] = Logprob(top_values[row][rank], rank + 1, text(top))
                if len(seq.prompt_logprobs) == position:
                    seq.prompt_logprobs.append(entry)
                row += 1


def _count(seq: Sequence, vocab: int) -> int:
    """Top logprobs a sequence asks for at each prompt position (-1: the whole vocabulary)."""
    k = seq.params.prompt_logprobs or 0
    return vocab if k == -1 else k


def request_prompt_logprobs(seq: Sequence) -> list[dict[int, Logprob] | None] | None:
    """RequestOutput.prompt_logprobs from the request's first sample: None until every prompt
    position is scored (or when none were asked for)."""
    if seq.params.prompt_logprobs is None:
        return None
    if len(seq.prompt_logprobs) < len(seq.prompt_token_ids) - 1:
        return None
    return [None, *seq.prompt_logprobs]
