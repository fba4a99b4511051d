"""One request must not stall everyone: hostile chat templates (trusted by this server, so
they do render) and huge prompts are worked off the event loop under time and size limits,
while /health, polled from another process every 20 ms, answers within 100 ms throughout."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest
from server_harness import HealthPoller, assert_no_stall, wait_idle_and_exact

from hostile.answers import check_error
from hostile.hostile_setup import BASE

MESSAGES = [{"role": "user", "content": "hello"}]
SLOW = ("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}"
        "{% endfor %}")
HUGE = "{% set s = 'x' * 1000000000 %}{{ s }}"
DOUBLING = ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}{{ ns.s }}")
PADDED = "{{ '{:>2000000000}'.format(1) }}"
RENDER_LIMIT_S = 2.0  # engine/chat_template.py TemplateLimits.timeout_s


@pytest.fixture
def health(hostile_server, tmp_path):
    poller = HealthPoller(hostile_server, str(tmp_path))
    time.sleep(0.1)  # a few polls before the storm
    yield poller
    poller.stop()


def _post(http, path: str, body: dict):
    start = time.monotonic()
    response = http.post(path, json=body)
    return response, time.monotonic() - start


def _assert_no_stall(health) -> None:
    polled = health.stop()
    assert polled["polls"] >= 2, polled
    assert_no_stall(polled)


@pytest.mark.parametrize("template", [SLOW, HUGE, DOUBLING, PADDED],
                         ids=["slow", "huge", "doubling", "padded"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_hostile_template_is_refused_without_stalling(path, template, http, hostile_server,
                                                      health):
    rss_before = hostile_server.rss_bytes()
    body = {"messages": MESSAGES, "chat_template": template}
    if path != "/tokenize":
        body.update(model=BASE, max_tokens=2)
    response, took = _post(http, path, body)
    assert response.status_code == 400, response.text
    assert "chat template" in check_error(response)["message"]
    assert took < RENDER_LIMIT_S + 1.5
    assert hostile_server.rss_bytes() - rss_before < 256 << 20
    _assert_no_stall(health)


def test_four_slow_templates_at_once(http, hostile_server, health):
    """The prompt workers are all busy with hostile renders; /health still answers, and a
    plain request gets through once they are cut."""
    body = {"messages": MESSAGES, "chat_template": SLOW, "model": BASE, "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _post(http, "/v1/chat/completions", body)[0],
                                range(4)))
    assert [a.status_code for a in answers] == [400] * 4
    plain = http.post("/v1/chat/completions", json={"model": BASE, "messages": MESSAGES,
                                                    "max_tokens": 2})
    assert plain.status_code == 200, plain.text
    _assert_no_stall(health)


def test_huge_prompts_tokenise_off_the_loop(http, hostile_server, health):
    text = "hello world, " * 75_000  # ~1 MB: just under the server's body limit
    for path, body in (("/tokenize", {"prompt": text}),
                       ("/v1/completions", {"model": BASE, "prompt": text, "max_tokens": 1}),
                       ("/v1/chat/completions", {"model": BASE, "max_tokens": 1,
                                                 "messages": [{"role": "user",
                                                               "content": text}]})):
        response = http.post(path, json=body)
        if path == "/tokenize":
            assert response.status_code == 200 and response.json()["count"] > 900_000
        else:
            assert response.status_code == 400, response.text
            assert "maximum context length" in check_error(response)["message"]
    wait_idle_and_exact(hostile_server.url)
    _assert_no_stall(health)


def test_the_probe_counts_a_frozen_server_as_a_stall(hostile_server, health):
    """The probe leaves out only the server's waits for a CPU: a server that does not run at
    all (stopped, as a blocked event loop would be) shows as a stall."""
    os.kill(hostile_server.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)
    finally:
        os.kill(hostile_server.proc.pid, signal.SIGCONT)
    time.sleep(0.1)
    polled = health.stop()
    assert polled["over_100ms"] >= 1 and polled["max_own_s"] > 0.25, polled["max_own_s"]
