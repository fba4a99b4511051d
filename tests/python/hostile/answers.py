"""Checks every answer of the hostile suite makes of the server's responses: no 5xx, errors in
OpenAI's shape, strict JSON (no NaN or Infinity), streams ending in exactly one [DONE], and no
server path in the body."""

from __future__ import annotations

import json


class Checker:
    """Checks every answer, and counts them by status."""

    def __init__(self, server_root: str):
        self.server_root = server_root
        self.statuses: dict[int, int] = {}

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    def check(self, response, streamed: bool = False) -> None:
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
