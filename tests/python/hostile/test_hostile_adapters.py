"""The adapter battery against a real server: links out of --allowed-lora-dirs, files that are
not what their names say, configs and headers nested 200,000 levels deep, NaN, Inf and huge
weights, an adapter whose files vanish after it was loaded. Every answer is 4xx (never 500) in
OpenAI's shape, names the file but no server path and echoes no file bytes; a failed adapter is
never listed; every stream ends with `data: [DONE]`; the pool's accounts are exact at the end."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from server_harness import wait_idle_and_exact

from hostile.adapter_battery import SECRET
from hostile.answers import check_error, check_stream, strict_loads
from hostile.hostile_setup import BASE, STATIC

SECRET_NUMBER = str(struct.unpack("<Q", SECRET[:8])[0])


@pytest.fixture(scope="module")
def battery(hostile_assets):
    return hostile_assets["battery"]


def _load(http, name: str, path: str):
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})


def _listed(http) -> set[str]:
    return {m["id"] for m in http.get("/v1/models").json()["data"]}


def _refused(http, hostile_assets, name: str, path: str, status: int) -> dict:
    response = _load(http, name, path)
    assert response.status_code == status, response.text
    error = check_error(response)
    text = response.text
    assert hostile_assets["root"] not in text and "/tmp" not in text, text
    assert SECRET_NUMBER not in text and "SECRETS" not in text and "do not echo" not in text
    assert name not in _listed(http)
    return error


CASES = [
    ("file_link_out", 403, "adapter_model.safetensors"),
    ("config_link_out", 403, "adapter_config.json"),
    ("dir_link_out", 403, "outside the allowed"),
    ("not_safetensors", 400, "adapter_model.safetensors is not a safetensors file"),
    ("link_to_secret", 400, "adapter_model.safetensors is not a safetensors file"),
    ("deep_config", 400, "adapter_config.json nests JSON deeper than 64 levels"),
    ("deep_header", 400, "nest"),
    ("bad_config", 400, "r="),
]


@pytest.mark.parametrize("case,status,says", CASES, ids=[c[0] for c in CASES])
def test_refused_before_anything_is_registered(case, status, says, http, battery,
                                               hostile_assets):
    error = _refused(http, hostile_assets, case, battery.dirs[case], status)
    assert says in error["message"], error
    assert error["param"] == "lora_path"
    # The name is free: nothing half-registered is left behind.
    good = _load(http, case, battery.dirs["good"])
    assert good.status_code == 200, good.text
    unload = http.post("/v1/unload_lora_adapter", json={"lora_name": case})
    assert unload.status_code == 200, unload.text


@pytest.mark.parametrize("case", ["nan", "inf"])
def test_nonfinite_weights_refused_naming_the_tensor(case, http, battery, hostile_assets):
    error = _refused(http, hostile_assets, case, battery.dirs[case], 400)
    assert battery.dirs[case + "_tensor"] in error["message"], error


def test_huge_weights_give_valid_json_and_clamped_logprobs(http, battery):
    loaded = _load(http, "huge", battery.dirs["huge"])
    assert loaded.status_code == 200, loaded.text
    body = {"model": "huge", "prompt": "hello", "max_tokens": 4, "temperature": 0.0,
            "logprobs": 3, "ignore_eos": True}
    full = http.post("/v1/completions", json=body)
    assert full.status_code == 200, full.text
    logprobs = strict_loads(full.text)["choices"][0]["logprobs"]
    assert all(x is None or -9999.0 <= x <= 0.0 for x in logprobs["token_logprobs"]), logprobs
    streamed = http.post("/v1/completions", json={**body, "stream": True})
    assert streamed.status_code == 200
    chunks = check_stream(streamed.text)
    assert all("error" not in c for c in chunks), chunks[-1]
    chat = {"model": "huge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0.0, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    for stream in (False, True):
        response = http.post("/v1/chat/completions", json={**chat, "stream": stream})
        assert response.status_code == 200, response.text
        if stream:
            check_stream(response.text)
        else:
            content = strict_loads(response.text)["choices"][0]["logprobs"]["content"]
            assert all(-9999.0 <= c["logprob"] <= 0.0 for c in content)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "huge"}).status_code == 200


def _evict_from_every_tier(http, battery) -> None:
    """Loads and uses other adapters until the host tier (3) and device slots (2) are full of
    them, so the next request of the first adapter reads its files again."""
    for name in ("churn_a", "churn_b"):
        assert _load(http, name, battery.dirs[name]).status_code == 200
    for _ in range(2):
        for name in (*STATIC, "churn_a", "churn_b"):
            response = http.post("/v1/completions", json={"model": name, "prompt": "x",
                                                          "max_tokens": 1})
            assert response.status_code == 200, response.text


def test_vanished_files_fail_clearly_and_unlist_the_adapter(http, battery, hostile_assets):
    path = battery.dirs["vanish"]
    assert _load(http, "vanish", path).status_code == 200
    body = {"model": "vanish", "prompt": "x", "max_tokens": 2}
    assert http.post("/v1/completions", json=body).status_code == 200
    shutil.rmtree(path)
    _evict_from_every_tier(http, battery)
    failed = http.post("/v1/completions", json=body)
    assert 400 <= failed.status_code < 500, failed.text
    error = check_error(failed)
    assert error["param"] == "model" and hostile_assets["root"] not in failed.text
    assert "vanish" not in _listed(http)
    again = http.post("/v1/completions", json={**body, "stream": True})
    if again.status_code == 200:  # a stream that had started: an error event, then [DONE]
        assert "error" in check_stream(again.text)[-1]
    else:
        assert 400 <= again.status_code < 500
        check_error(again)
    for name in ("vanish", "churn_a", "churn_b"):
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_streams_of_a_vanished_adapter_end_with_done(http, battery, hostile_assets):
    """Whatever the engine makes of it, a stream of an adapter whose files went away ends in
    [DONE], with an error event if it failed, and no answer is a 5xx."""
    path = os.path.join(battery.allowed, "vanish_stream")
    shutil.copytree(battery.dirs["good"], path)
    assert _load(http, "vanish_stream", path).status_code == 200
    shutil.rmtree(path)
    _evict_from_every_tier(http, battery)
    for stream in (True, False):
        response = http.post("/v1/completions", json={"model": "vanish_stream", "prompt": "x",
                                                      "max_tokens": 2, "stream": stream})
        assert response.status_code < 500, response.text
        if response.status_code == 200 and stream:
            check_stream(response.text)
        assert hostile_assets["root"] not in response.text
    for name in ("vanish_stream", "churn_a", "churn_b"):
        http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_accounts_exact_after_the_battery(hostile_server, http):
    wait_idle_and_exact(hostile_server.url)
    listed = _listed(http)
    assert listed == {BASE, *STATIC}, listed
    models = json.loads(http.get("/v1/models").text)
    assert all(m["id"] in listed for m in models["data"])
