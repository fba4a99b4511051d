"""Driving an engine to the end in tests, with a bound instead of a hang."""

from __future__ import annotations

import time


def finish_all(engine, timeout_s: float = 120.0, on_output=None) -> None:
    """Steps until every request is done (steps that only wait for a load are short), within
    `timeout_s`: a request that never finishes fails the test instead of hanging it."""
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, f"requests unfinished after {timeout_s} s"
        for out in engine.step():
            if on_output is not None:
                on_output(out)


def finished_tokens(engine, timeout_s: float = 120.0) -> dict[str, list[int]]:
    """finish_all, returning each finished request's generated token ids by request id."""
    tokens: dict[str, list[int]] = {}

    def keep(out) -> None:
        if out.finished:
            tokens[out.request_id] = list(out.outputs[0].token_ids)

    finish_all(engine, timeout_s, keep)
    return tokens
