"""Sampling that leaves the tokens on the device, for async scheduling.

The same rules as moelora.engine.sampler.sample (greedy, temperature / top-k / top-p / min-p with
each request's generator, min_tokens holding back EOS and the stop ids, logprobs of the unmodified
distribution) with nothing that waits for the GPU: the next step reads the tokens on the device,
and one device-to-host copy into pinned memory, marked by an event, brings tokens, logprobs and
top logprobs to the host when the engine asks. Requests that adjust their logits (penalties over
their own tokens, logit bias) must have every token on the host (no pending token): the engine
waits for the step before theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moelora.engine.sampler import SampleRequest, _eos_blocked, _mask_top_k_top_p, adjust_logits
from moelora.engine.sampling_params import SamplingParams


@dataclass
class DeviceSampleRequest:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    eos_token_ids: tuple[int, ...]
    num_generated: int  # tokens sampled before this one (pending ones included)
    prompt_token_ids: list[int]  # read only by requests that adjust their logits
    output_token_ids: list[int]


class SampledTokens:
    """A step's sampled tokens: `tokens` on the device at once, the host copy on wait()."""

    def __init__(self, tokens: torch.Tensor, packed: torch.Tensor, top_counts: list[int]):
        self.tokens = tokens  # int64 [n] on the device
        self._top_counts = top_counts
        if packed.device.type == "cuda":
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = packed, None

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> tuple[list[int], list[float], list[list[tuple[int, float]] | None]]:
        """(token ids, chosen logprobs, top logprobs per row) once the copy is done."""
        self.wait()
        values = self._host.tolist()
        n = len(self._top_counts)
        tokens = [int(v) for v in values[:n]]
        logprobs = values[n:2 * n]
        tops: list[list[tuple[int, float]] | None] = []
        offset = 2 * n
        for count in self._top_counts:
            if count == 0:
                tops.append(None)
                continue
            ids = values[offset:offset + count]
            tops.append([(int(i), v) for i, v in zip(ids, values[offset + count:
                                                                 offset + 2 * count])])
            offset += 2 * count
        return tokens, logprobs, tops


def sample_on_device(logits: torch.Tensor, requests: list[DeviceSampleRequest]) -> SampledTokens:
    """logits: float32 [len(requests), vocab]."""
    logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    for row, req in enumerate(requests):
        adjusts, blocked = req.params.adjusts_logits, _eos_blocked(req)
        if req.params.greedy and not blocked and not adjusts:
            continue  # the batched argmax
        row_logits = logits[row]
        if adjusts:
            if req.num_generated != len(req.output_token_ids):
                raise ValueError("a request that adjusts its logits needs its tokens on the host")
            row_logits = adjust_logits(row_logits, SampleRequest(
                req.params, req.generator, req.eos_token_ids, req.prompt_token_ids,
                req.output_token_ids))
        if blocked:
            row_logits = row_logits.clone()
            row_logits[list(req.eos_token_ids)] = float("-inf")
            if req.params.stop_token_ids:
                row_logits[req.params.stop_token_ids] = float("-inf")
        if req.params.greedy:
            tokens[row] = torch.argmax(row_logits)
            continue
        scaled = _mask_top_k_top_p(row_logits / req.params.temperature, req.params.top_k,
                                   req.params.top_p, req.params.min_p)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs).exponential_(1.0, generator=req.generator)
        tokens[row] = torch.argmax(probs / noise)
    chosen = logprobs_all.gather(1, tokens[:, None])[:, 0]
    pieces = [tokens.double(), chosen.double()]
    top_counts = []
    for row, req in enumerate(requests):
        count = req.params.logprobs or 0
        top_counts.append(count)
        if count:
            values, indices = torch.topk(logprobs_all[row], count)
            pieces += [indices.double(), values.double()]
    return SampledTokens(tokens, torch.cat(pieces), top_counts)
