"""The prompts of `moelora bench serve`: random words cut to an exact number of tokens.

A random word of 2-7 letters is several tokens of most tokenizers, so "N words" is several times
N tokens; prompts are therefore sized with a tokenizer: a local one (--tokenizer), or the
server's own through /tokenize and /detokenize (vLLM's routes, which moelora serves too): the
words are tokenized, cut to N tokens and decoded back to text. A server without those routes (or
without a tokenizer) gets N-word prompts, and the benchmark says that their length is
approximate.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

_LETTERS = "etaoinshrdlucmfwypvbgkjqxz"


@dataclass
class RequestSpec:
    prompt: str
    output_len: int
    model: str
    adapter: str | None


def _random_word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 7)))


def random_prompt(rng: random.Random, num_tokens: int, tokenizer=None) -> str:
    """Random token-ish text: `num_tokens` words, or exactly `num_tokens` tokens of the given
    tokenizer."""
    if tokenizer is None:
        return " ".join(_random_word(rng) for _ in range(num_tokens))
    words, ids = [], []
    while len(ids) < num_tokens:
        words.extend(_random_word(rng) for _ in range(max(1, num_tokens - len(ids))))
        before, ids = len(ids), tokenizer.encode(" ".join(words), add_special_tokens=False)
        _check_growth(before, len(ids))
    return tokenizer.decode(ids[:num_tokens])


def _check_growth(before: int, after: int) -> None:
    if after <= before:
        raise ValueError(f"the tokenizer turns more words into no more tokens ({after}): it "
                         f"cannot size random prompts")


class ServerTokenizerUnavailable(RuntimeError):
    """The server has no /tokenize route or no tokenizer."""


class ServerTokenizer:
    """Sizes prompts with the server's /tokenize and /detokenize."""

    def __init__(self, session, base_url: str, headers: dict, model: str):
        self.session, self.base_url, self.headers, self.model = session, base_url, headers, model

    async def _post(self, route: str, body: dict) -> dict:
        async with self.session.post(self.base_url + route, json={"model": self.model, **body},
                                     headers=self.headers) as response:
            if response.status != 200:
                text = (await response.text())[:300]
                raise ServerTokenizerUnavailable(f"POST {route}: HTTP {response.status}: {text}")
            return await response.json()

    async def encode(self, text: str) -> list[int]:
        return (await self._post("/tokenize", {"prompt": text,
                                               "add_special_tokens": False}))["tokens"]

    async def decode(self, ids: list[int]) -> str:
        return (await self._post("/detokenize", {"tokens": ids}))["prompt"]

    async def prompt(self, rng: random.Random, num_tokens: int) -> str:
        """Random words cut to `num_tokens` tokens of the server's tokenizer."""
        words, ids = [], []
        while len(ids) < num_tokens:
            words.extend(_random_word(rng) for _ in range(max(1, num_tokens - len(ids))))
            before, ids = len(ids), await self.encode(" ".join(words))
            _check_growth(before, len(ids))
        return await self.decode(ids[:num_tokens])


def adapter_weights(n: int, popularity: str, alpha: float) -> list[float]:
    if popularity == "zipf":
        return [1.0 / (i + 1) ** alpha for i in range(n)]
    return [1.0] * n


def _plan(args, base_model: str, rng: random.Random) -> list[tuple[int, int, str | None]]:
    """(input tokens, output tokens, adapter) of every request."""
    adapters = [spec.partition("=")[0] for spec in args.lora_modules]
    weights = adapter_weights(len(adapters), args.lora_popularity, args.zipf_alpha)

    def length(mean: int) -> int:
        low = max(1, math.floor(mean * (1 - args.random_range_ratio)))
        high = max(low, math.ceil(mean * (1 + args.random_range_ratio)))
        return rng.randint(low, high)

    plan = []
    for _ in range(args.num_prompts):
        adapter = rng.choices(adapters, weights)[0] if adapters else None
        plan.append((length(args.random_input_len), length(args.random_output_len), adapter))
    return plan


def make_requests(args, base_model: str, tokenizer=None) -> list[RequestSpec]:
    """The requests, sized with a local tokenizer (or by words when None)."""
    rng = random.Random(args.seed)
    return [RequestSpec(random_prompt(rng, n_in, tokenizer), n_out, adapter or base_model,
                        adapter) for n_in, n_out, adapter in _plan(args, base_model, rng)]


async def make_requests_sized_by_server(args, base_model: str,
                                        server: ServerTokenizer) -> list[RequestSpec]:
    """The requests, sized by the server's tokenizer (ServerTokenizerUnavailable without one)."""
    rng = random.Random(args.seed)
    return [RequestSpec(await server.prompt(rng, n_in), n_out, adapter or base_model, adapter)
            for n_in, n_out, adapter in _plan(args, base_model, rng)]
