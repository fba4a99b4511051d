"""The soak: 2,000 requests from 16 concurrent clients (completions and chat, streaming or not,
base model and adapters, some clients hanging up mid-stream) while another client loads and
unloads adapters the whole time. Every request gets an answer (no 5xx, every finished stream
ends in [DONE]), /health never takes over 100 ms, the server's RSS stays flat after warm-up,
and the pool's pages and pins are exact at the end. Marked `soak`: about 30 s on a 2-core CPU,
so the default run (and CI) includes it; `-m soak` runs it alone."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from server_harness import HealthPoller, assert_no_stall, wait_idle_and_exact

from hostile.hostile_setup import BASE, STATIC

pytestmark = pytest.mark.soak

REQUESTS = 2000
WARMUP = 200
CLIENTS = 16
CHURNED = ["churn_a", "churn_b"]
RSS_GROWTH_LIMIT = 64 << 20
REQUEST_TIMEOUT_S = 30.0  # a request of at most 8 tokens; longer means the server is stuck
PHASE_TIMEOUT_S = 300.0  # the whole warm-up, and the whole measured run


def _request(rng: random.Random, i: int) -> tuple[str, dict]:
    model = rng.choice([BASE, BASE, *STATIC, *CHURNED])
    common = {"model": model, "max_tokens": rng.randint(1, 8), "stream": rng.random() < 0.4,
              "temperature": rng.choice([0.0, 0.7]), "seed": i, "ignore_eos": True}
    if rng.random() < 0.3:
        common["logprobs"] = rng.randint(0, 3)
    if rng.random() < 0.5:
        return "/v1/completions", {**common, "prompt": f"soak {i}: " + "x" * rng.randint(1, 40)}
    chat = {**common, "messages": [{"role": "user", "content": f"soak {i}"}]}
    if "logprobs" in chat:
        chat["top_logprobs"] = chat.pop("logprobs")
        chat["logprobs"] = True
    return "/v1/chat/completions", chat


class Tally:
    def __init__(self):
        self.statuses: dict[int, int] = {}
        self.hung_up = 0
        self.bad: list[str] = []

    def add(self, status: int, problem: str | None = None) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if problem is not None:
            self.bad.append(problem)


async def _send(client: httpx.AsyncClient, path: str, body: dict, hang_up: bool,
                tally: Tally) -> None:
    if not body["stream"]:
        response = await client.post(path, json=body)
        problem = None
        if response.status_code >= 500:
            problem = response.text[:300]
        elif response.status_code == 200:
            choices = response.json()["choices"]
            if not all(c["finish_reason"] for c in choices):
                problem = f"unfinished: {response.text[:300]}"
        tally.add(response.status_code, problem)
        return
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            tally.add(response.status_code,
                      response.text[:300] if response.status_code >= 500 else None)
            return
        events = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if hang_up:
                    tally.hung_up += 1
                    tally.add(200)
                    return
        problem = None
        if not events or events[-1] != "[DONE]":
            problem = f"stream without [DONE]: {events[-2:]}"
        elif any("error" in json.loads(e) for e in events[:-1]):
            error = next(json.loads(e) for e in events[:-1] if "error" in json.loads(e))
            if error["error"]["code"] >= 500:
                problem = f"error event: {error}"
        tally.add(200, problem)


async def _churn(client: httpx.AsyncClient, paths: dict, stop: asyncio.Event,
                 tally: Tally) -> int:
    cycles = 0
    while not stop.is_set():
        for name in CHURNED:  # each serves for a while, then goes with requests in flight
            load = await client.post("/v1/load_lora_adapter",
                                     json={"lora_name": name, "lora_path": paths[name]})
            await asyncio.sleep(0.3)
            unload = await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
            for response in (load, unload):
                if response.status_code >= 500:
                    tally.bad.append(f"churn: {response.text[:300]}")
        cycles += 1
    for name in CHURNED:  # leave them unloaded
        await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    return cycles


def test_soak_with_adapter_churn(hostile_server, hostile_assets, tmp_path):
    paths = hostile_assets["battery"].dirs
    rng = random.Random(2000)
    plan = [(*_request(rng, i), rng.random() < 0.05) for i in range(REQUESTS)]
    tally = Tally()

    async def run(batch) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for item in batch:
            queue.put_nowait(item)
        limits = httpx.Limits(max_connections=CLIENTS + 2)
        async with httpx.AsyncClient(base_url=hostile_server.url, timeout=REQUEST_TIMEOUT_S,
                                     limits=limits) as client:
            async def worker() -> None:
                while not queue.empty():
                    path, body, hang_up = queue.get_nowait()
                    await _send(client, path, body, hang_up, tally)

            stop = asyncio.Event()
            churn = asyncio.create_task(_churn(client, paths, stop, tally))
            try:
                await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(CLIENTS)]),
                                       PHASE_TIMEOUT_S)
            finally:
                stop.set()
            assert await asyncio.wait_for(churn, REQUEST_TIMEOUT_S * 4) > 0

    asyncio.run(run(plan[:WARMUP]))
    wait_idle_and_exact(hostile_server.url)
    rss_after_warmup = hostile_server.rss_bytes()
    with HealthPoller(hostile_server, str(tmp_path)) as health:
        asyncio.run(run(plan[WARMUP:]))
        polled = health.stop()

    answered = sum(tally.statuses.values())
    assert answered == REQUESTS, tally.statuses  # none lost
    assert not tally.bad, tally.bad[:5]
    assert tally.statuses.get(200, 0) > REQUESTS // 2, tally.statuses
    wait_idle_and_exact(hostile_server.url)
    growth = hostile_server.rss_bytes() - rss_after_warmup
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth >> 20} MiB over {REQUESTS} requests"
    assert_no_stall(polled)
