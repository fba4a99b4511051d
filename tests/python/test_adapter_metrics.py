"""Adapter load metrics as Prometheus series (moelora.engine.adapter_metrics), on the CPU engine
with real files and threads: the exported counters and per-tier latency histograms equal the
AdapterManager's own numbers, and the OpenAI server serves them on /metrics over real HTTP
(loopback) next to its other series."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from moelora.engine.adapter_metrics import register_adapter_metrics
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "metrics-test-key"
ADAPTERS = ("poet", "chef", "pirate")  # three adapters through two slots and two host copies


def samples_of(text: str) -> dict:
    """{(sample name, frozenset(labels)): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def check_series_match(samples: dict, m: dict) -> None:
    """Every exported series equals AdapterManager.metrics()."""
    for tier in ("host", "device"):
        assert value(samples, "moelora:adapter_loads_total", tier=tier) == m["loads"][tier]
        assert value(samples, "moelora:adapter_evictions_total", tier=tier) == \
            m["evictions"][tier]
        histogram = m["load_seconds"][tier]
        assert value(samples, "moelora:adapter_load_seconds_count", tier=tier) == \
            m["loads"][tier]
        assert value(samples, "moelora:adapter_load_seconds_sum", tier=tier) == \
            pytest.approx(histogram["sum"])
        for le, count in histogram["buckets"]:
            assert value(samples, "moelora:adapter_load_seconds_bucket", tier=tier,
                         le=le) == count
        assert value(samples, "moelora:adapter_hits_total", tier=tier) == m["arrivals"][tier]
    assert value(samples, "moelora:adapter_load_failures_total", tier="host") == \
        m["load_failures"]["host"]
    for found, count in m["arrivals"].items():
        assert value(samples, "moelora:adapter_requests_total", found=found) == count
    for path, count in m["bytes"].items():
        assert value(samples, "moelora:adapter_load_bytes_total", path=path) == count
    for state, count in m["host_memory"].items():
        assert value(samples, "moelora:adapter_host_memory_bytes", state=state) == count
    assert m["host_memory"]["in_use"] > 0  # the host copies of the adapters that ran


def test_exported_series_equal_the_managers_numbers(assets):
    from moelora import LLM, LoRARequest, SamplingParams

    model_dir, adapters = assets
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with LLM(model=model_dir, device="cpu", enable_lora=True, max_lora_rank=16, max_loras=2,
             max_cpu_loras=2, max_model_len=128) as llm:
        manager = llm.llm_engine.adapters
        registry = CollectorRegistry()
        register_adapter_metrics(registry, manager.metrics)
        loras = [LoRARequest(name, k + 1, adapters[name]) for k, name in enumerate(ADAPTERS)]
        # Back in reverse order: the two most recent are resident (device hits), the first
        # was evicted from both tiers.
        for lora in loras + loras[::-1]:
            llm.generate("hello", params, lora, use_tqdm=False)
        m = manager.metrics()
        assert m["loads"]["device"] == 4 and m["evictions"]["device"] == 2
        assert m["evictions"]["host"] >= 1 and m["arrivals"]["device"] == 2
        check_series_match(samples_of(generate_latest(registry).decode()), m)
        # A second exporter of the same names in one registry is refused, not doubled.
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            register_adapter_metrics(registry, manager.metrics)


def test_a_failing_source_leaves_the_scrape_working():
    def broken():
        raise RuntimeError("the engine is shutting down")

    registry = CollectorRegistry()
    register_adapter_metrics(registry, broken)
    register_adapter_metrics(other := CollectorRegistry(), dict)  # no adapters: {}
    assert "adapter_" not in generate_latest(registry).decode()
    assert "adapter_" not in generate_latest(other).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_serves_adapter_metrics_over_http(assets):
    import argparse

    import uvicorn
    from moelora.entrypoints.openai.api_server import build_app, build_engine
    from moelora.entrypoints.openai.cli_args import add_cli_args

    model_dir, adapters = assets
    port = _free_port()
    args = add_cli_args(argparse.ArgumentParser()).parse_args([
        model_dir, "--device", "cpu", "--api-key", API_KEY, "--max-loras", "2",
        "--max-cpu-loras", "2", "--max-model-len", "128", "--port", str(port),
        "--lora-host-reserve-mb", "1",
        "--lora-modules", *[f"{name}={adapters[name]}" for name in ADAPTERS]])
    engine, model_path, loras, enable_lora = build_engine(args)
    assert engine.config.adapter_host_reserve_bytes == 1 << 20
    app = build_app(engine, model_path, args, loras, enable_lora)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on",
                                           log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for name in ADAPTERS:
            reply = httpx.post(url + "/v1/completions", headers=headers, timeout=60, json={
                "model": name, "prompt": "hello", "max_tokens": 2, "temperature": 0})
            assert reply.status_code == 200, reply.text
        samples = samples_of(httpx.get(url + "/metrics", timeout=10).text)
        m = engine.adapters.metrics()
        check_series_match(samples, m)
        assert m["loads"]["device"] >= 3 and m["evictions"]["device"] >= 1
        # next to the server's own series
        assert ("moelora:lora_loads_total", frozenset({("to", "device")})) in samples
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "server did not stop"
