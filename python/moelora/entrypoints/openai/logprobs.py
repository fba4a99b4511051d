"""Logprobs in the completions and chat shapes.

JSON has no NaN or infinities, and an adapter with huge weights can make the model's logits
overflow: every logprob is clamped to a finite number first, as vLLM does (-inf and NaN become
-9999.0), so every response and every stream chunk stays valid JSON.
"""

from __future__ import annotations

import math

LOGPROB_FLOOR = -9999.0  # vLLM's value for a logprob that is not a finite number


def finite_logprob(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    return 0.0 if value == math.inf else LOGPROB_FLOOR


class LogprobFormatter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token_text(self, token_id: int, as_ids: bool = False) -> str:
        if as_ids or self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, entries, token_ids, offset: int, as_ids: bool) -> dict:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = self.token_text(token_id, as_ids)
            chosen = entry.get(token_id)
            tokens.append(text)
            token_logprobs.append(finite_logprob(chosen.logprob) if chosen is not None
                                  else None)
            top = {}
            for tid, lp in _ranked(entry):  # best first: a repeated text keeps the best
                top.setdefault(self.token_text(tid, as_ids), lp)
            if not top and chosen is not None:
                top = {text: finite_logprob(chosen.logprob)}
            top_logprobs.append(top)
            offsets.append(offset)
            offset += len(self.token_text(token_id))  # offsets count characters of the text
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": offsets}

    def chat(self, entries, token_ids, as_ids: bool) -> dict:
        content = []
        for token_id, entry in zip(token_ids, entries):
            text = self.token_text(token_id, as_ids)
            chosen = entry.get(token_id)
            top = [{"token": self.token_text(tid, as_ids), "logprob": lp,
                    "bytes": list(self.token_text(tid, as_ids).encode("utf-8"))}
                   for tid, lp in _ranked(entry)]
            content.append({"token": text,
                            "logprob": (finite_logprob(chosen.logprob) if chosen is not None
                                        else None),
                            "bytes": list(text.encode("utf-8")), "top_logprobs": top})
        return {"content": content}


def _ranked(entry: dict) -> list[tuple[int, float]]:
    ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items()
                    if lp.rank is not None)
    return [(tid, finite_logprob(logprob)) for _, tid, logprob in ranked]
