"""Pool oversubscription on a server whose page pool is sized with --kv-cache-memory-bytes (a
CPU pool of 2 MiB: 256 pages of 8 KiB; two adapters take about half, which leaves about 500
tokens of KV over the demo model's 4 layers): concurrent requests that need several times the pool all finish through
preemption, none lost; a request the pool can never hold is refused up front with the numbers;
the pool's accounts are exact at the end."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from server_harness import ServerProcess, metrics, server_env, value, wait_idle_and_exact

from hostile.answers import check_error
from hostile.hostile_setup import BASE

POOL = "2MiB"


@pytest.fixture(scope="module")
def small_pool_server(hostile_assets, tmp_path_factory):
    adapters = hostile_assets["adapters"]
    server = ServerProcess([hostile_assets["model"], "--served-model-name", BASE, "--device",
                            "cpu", "--max-model-len", "2048", "--kv-cache-memory-bytes", POOL,
                            "--max-num-seqs", "16", "--max-loras", "2",
                            "--lora-modules", f"poet={adapters['poet']}",
                            f"chef={adapters['chef']}"],
                           server_env(), str(tmp_path_factory.mktemp("pool") / "log"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_pool_size_flag_sets_the_pool(small_pool_server):
    samples = metrics(small_pool_server.url)
    assert value(samples, "moelora:pool_total_pages") == (2 << 20) // (8 << 10)


def test_oversubscribed_requests_all_finish(small_pool_server):
    """16 requests of 80 + 120 tokens need ~3,200 tokens of KV."""
    prompts = [[(7 * i + j) % 250 for j in range(80)] for i in range(16)]
    models = [BASE, "poet", "chef", BASE]

    def one(i: int):
        return httpx.post(small_pool_server.url + "/v1/completions", timeout=300, json={
            "model": models[i % 4], "prompt": prompts[i], "max_tokens": 120,
            "temperature": 0.0, "ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers
                                                             if a.status_code != 200][:2]
    assert all(a.json()["usage"]["completion_tokens"] == 120 for a in answers)
    assert value(metrics(small_pool_server.url), "moelora:num_preemptions_total") > 0
    wait_idle_and_exact(small_pool_server.url)


def test_a_request_the_pool_can_never_hold_is_refused_up_front(small_pool_server):
    body = {"model": BASE, "prompt": [5] * 1200, "max_tokens": 100}  # 328 pages of KV
    for stream in (False, True):
        response = httpx.post(small_pool_server.url + "/v1/completions", timeout=60,
                              json={**body, "stream": stream})
        assert response.status_code == 400, response.text
        message = check_error(response)["message"]
        assert "1200" in message and "100" in message, message
    wait_idle_and_exact(small_pool_server.url)
