"""SIGTERM with requests in flight, on a real server process: admission stops at once (503 with
Retry-After, /health too), a short request in flight finishes, long ones are cut when
--shutdown-timeout passes (a stream ends with an error event and `data: [DONE]`, a plain
request gets a JSON 503), no request is lost, and the process exits with status 0."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
from server_harness import ServerProcess, metrics, server_env, value

from hostile.answers import check_error, check_stream
from hostile.hostile_setup import BASE

SHUTDOWN_TIMEOUT_S = 6.0  # the long requests need far longer (4,000 tokens each)


def test_sigterm_drains_then_exits_zero(hostile_assets, tmp_path):
    server = ServerProcess([hostile_assets["model"], "--served-model-name", BASE, "--device",
                            "cpu", "--max-model-len", "4096", "--shutdown-timeout",
                            str(SHUTDOWN_TIMEOUT_S)], server_env(), str(tmp_path / "log"))
    answers: dict[str, httpx.Response | str] = {}
    long_body = {"model": BASE, "prompt": "tell me everything", "max_tokens": 4000,
                 "temperature": 0.0, "ignore_eos": True}

    def stream() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={**long_body, "stream": True}) as response:
            answers["stream"] = "".join(response.iter_text())

    def post(name: str, body: dict) -> None:
        answers[name] = httpx.post(server.url + "/v1/completions", json=body, timeout=60)

    try:
        server.wait_ready()
        clients = [threading.Thread(target=stream),
                   threading.Thread(target=post, args=("long", long_body))]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 20
        while value(metrics(server.url), "moelora:num_requests_running") < 2:
            assert time.monotonic() < deadline, "the long requests never started"
            time.sleep(0.05)
        short = threading.Thread(target=post, args=("short", {**long_body, "max_tokens": 24}))
        short.start()
        while value(metrics(server.url), "moelora:requests_in_flight") < 3 and \
                "short" not in answers:
            assert time.monotonic() < deadline, "the short request never started"
            time.sleep(0.01)
        signalled = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        time.sleep(0.3)  # the next tick of the server's loop starts the drain

        refused = httpx.post(server.url + "/v1/completions", json=long_body, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "shutting down" in check_error(refused)["message"]
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200

        for client in (*clients, short):
            client.join(30)
        exit_status = server.proc.wait(30)
        took = time.monotonic() - signalled
    finally:
        server.stop()

    assert exit_status == 0, server.logs()
    assert SHUTDOWN_TIMEOUT_S <= took < SHUTDOWN_TIMEOUT_S + 10
    finished = answers["short"]
    assert finished.status_code == 200, finished.text
    assert finished.json()["choices"][0]["finish_reason"] == "length"
    cut = answers["long"]
    assert cut.status_code == 503, cut.text
    assert "--shutdown-timeout" in check_error(cut)["message"]
    events = check_stream(answers["stream"])
    assert events[0]["choices"], events[0]  # it had been streaming
    assert events[-1]["error"]["code"] == 503, events[-1]
