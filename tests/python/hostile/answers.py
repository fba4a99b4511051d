"""Checks every answer of the hostile suite makes of the server's responses: no 5xx, errors in
OpenAI's shape, strict JSON (no NaN or Infinity), streams ending in exactly one [DONE], and no
server path in the body."""

from __future__ import annotations

import json
import time


class Checker:
    """Checks every answer, and counts them by status."""

    def __init__(self, server_root: str):
        self.server_root = server_root
        self.statuses: dict[int, int] = {}
        self.timeline: list[tuple[float, float, str, bytes]] = []  # start, seconds, path, body

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    def during(self, slow_polls: list) -> list[str]:
        """The requests that were in flight during each slow /health poll."""
        found = []
        for start, seconds in slow_polls:
            for begin, took, path, body in self.timeline:
                if begin < start + seconds and start < begin + took:
                    found.append(f"{seconds * 1000:.0f} ms poll during {path} "
                                 f"({took:.2f} s): {body[:300]!r}")
        return found

    def check(self, response, streamed: bool = False) -> None:
        took = response.elapsed.total_seconds()
        body = getattr(response.request, "_content", b"")  # absent for streamed uploads
        self.timeline.append((time.time() - took, took, response.request.url.path, body))
        status = response.status_code
        self.statuses[status] = self.statuses.get(status, 0) + 1
        text = response.text
        assert status < 500, (response.request.content[:300], text[:500])
        if response.request.url.path != "/v1/models":  # lists model roots, as vLLM does
            assert self.server_root not in text, text[:500]
        if streamed and response.status_code == 200 and \
                response.headers.get("content-type", "").startswith("text/event-stream"):
            check_stream(text)
            return
        if response.status_code >= 400:
            check_error(response)
        elif response.headers.get("content-type", "").startswith("application/json"):
            strict_loads(text)


def check_error(response) -> dict:
    error = strict_loads(response.text)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == response.status_code and error["message"]
    return error


def check_stream(text: str) -> list:
    """The JSON events of an SSE body, after checking it ends with exactly one [DONE]."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    assert "[DONE]" not in events[:-1]
    return [strict_loads(event) for event in events[:-1]]


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as a strict client does."""
    def refuse(name):
        raise AssertionError(f"{name} in a response: not JSON")
    return json.loads(text, parse_constant=refuse)
