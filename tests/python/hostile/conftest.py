"""The hostile suite's shared server: the demo model and adapters, served by a real
`moelora serve` process on 127.0.0.1 with runtime adapter updates, an allowed adapter
directory full of traps, request templates trusted (they are the attack surface under test),
small context and body limits (so generated requests stay cheap), and few adapter slots (so
adapters churn between the tiers)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("hypothesis")
import httpx
from moelora.demo.assets import build_demo_assets
from server_harness import ServerProcess, server_env, yielding_cpu_to_server

from hostile.adapter_battery import build_battery
from hostile.hostile_setup import BASE, BODY_LIMIT, MAX_MODEL_LEN, STATIC


@pytest.fixture(scope="package")
def hostile_assets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hostile"))
    model_dir, adapters = build_demo_assets(os.path.join(root, "demo"))
    battery = build_battery(root, adapters)
    return {"root": root, "model": model_dir, "adapters": adapters, "battery": battery}


@pytest.fixture(scope="package")
def hostile_server(hostile_assets, tmp_path_factory):
    a = hostile_assets
    args = [a["model"], "--served-model-name", BASE, "--device", "cpu",
            "--lora-modules", *[f"{n}={a['adapters'][n]}" for n in STATIC],
            "--enable-runtime-lora-updating", "--allowed-lora-dirs", a["battery"].allowed,
            "--trust-request-chat-template", "--max-loras", "2", "--max-cpu-loras", "3",
            "--max-lora-rank", "16", "--max-num-seqs", "32", "--max-num-batched-tokens", "512",
            "--max-model-len", str(MAX_MODEL_LEN), "--max-request-body-bytes", str(BODY_LIMIT)]
    log = str(tmp_path_factory.mktemp("hostile-logs") / "server.log")
    proc = ServerProcess(args, server_env(), log)
    try:
        with yielding_cpu_to_server():  # after the server started: it keeps the usual priority
            proc.wait_ready()
            yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="package")
def http(hostile_server):
    with httpx.Client(base_url=hostile_server.url, timeout=60) as client:
        yield client
