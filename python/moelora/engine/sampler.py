"""Turns a step's logits into tokens: greedy, temperature, top-k, top-p, min-p, seeded.

Each request draws from its own torch.Generator (seeded from SamplingParams.seed, or from the
engine's seed and the request id), so a request's tokens do not depend on what else is in the
batch. Sampling uses the exponential race (argmax of p / Exp(1)), which is one draw per
vocabulary entry from that generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from moelora.engine.sampling_params import SamplingParams


@dataclass
class SampleRequest:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    eos_token_ids: tuple[int, ...]
    prompt_token_ids: list[int] = field(default_factory=list)  # for repetition_penalty
    output_token_ids: list[int] = field(default_factory=list)  # for penalties and min_tokens

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # logprob of each chosen token (of the unmodified distribution)
    top_logprobs: list[list[tuple[int, float]] | None]


def _mask_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        cumulative = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = cumulative >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> SampleResult:
    """logits: float32 [len(requests), vocab] on any device.

    Plain greedy rows (the common case) take one batched argmax and every chosen logprob one
    gather, so a step costs a few device syncs rather than two per request."""
    logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    token_ids: list[int | None] = [None] * len(requests)
    plain_greedy = [row for row, req in enumerate(requests)
                    if req.params.greedy and not _eos_blocked(req)
                    and not req.params.adjusts_logits]
    if plain_greedy:
        rows = torch.tensor(plain_greedy, device=logits.device)
        for row, token in zip(plain_greedy, logits[rows].argmax(dim=-1).tolist()):
            token_ids[row] = token
    for row, req in enumerate(requests):
        if token_ids[row] is None:
            token_ids[row] = _sample_row(logits[row], req)
    chosen = logprobs_all[torch.arange(len(requests), device=logits.device),
                          torch.tensor(token_ids, device=logits.device)]
    chosen_logprobs = [float(v) for v in chosen.tolist()]
    top_logprobs: list[list[tuple[int, float]] | None] = []
    for row, req in enumerate(requests):
        if req.params.logprobs:
            values, indices = torch.topk(logprobs_all[row], req.params.logprobs)
            top_logprobs.append(list(zip(indices.tolist(), values.tolist())))
        else:
            top_logprobs.append(None)
    return SampleResult(token_ids, chosen_logprobs, top_logprobs)


def _eos_blocked(req: SampleRequest) -> bool:
    """Whether EOS (and the stop ids) are masked: fewer than min_tokens generated so far."""
    return req.num_generated < req.params.min_tokens and bool(req.eos_token_ids)


def adjust_logits(row_logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    """logit_bias, then vLLM's penalties: repetition (transformers' rule, over prompt and
    output tokens), then frequency and presence (over output tokens). Returns a new tensor."""
    params = req.params
    logits = row_logits.clone()
    if params.logit_bias:
        vocab = logits.shape[0]
        ids = [t for t in params.logit_bias if t < vocab]
        logits[ids] += torch.tensor([params.logit_bias[t] for t in ids], dtype=logits.dtype,
                                    device=logits.device)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.prompt_token_ids) | set(req.output_token_ids)),
                            dtype=torch.int64, device=logits.device)
        if seen.numel():
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / params.repetition_penalty,
                                       values * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and req.output_token_ids:
        out = torch.tensor(req.output_token_ids, dtype=torch.int64, device=logits.device)
        counts = torch.zeros_like(logits).scatter_add_(0, out, torch.ones_like(out,
                                                                             dtype=logits.dtype))
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def _sample_row(row_logits: torch.Tensor, req: SampleRequest) -> int:
    params = req.params
    if params.adjusts_logits:
        row_logits = adjust_logits(row_logits, req)
    if _eos_blocked(req):
        row_logits = row_logits.clone()
        row_logits[list(req.eos_token_ids)] = float("-inf")
        blocked = params.stop_token_ids
        if blocked:
            row_logits[blocked] = float("-inf")
    if params.greedy:
        return int(torch.argmax(row_logits).item())
    scaled = _mask_top_k_top_p(row_logits / params.temperature, params.top_k, params.top_p,
                               params.min_p)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=req.generator)
    return int(torch.argmax(probs / noise).item())


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
