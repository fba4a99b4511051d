"""The OpenAI-compatible server, end to end: a real `moelora serve` process (uvicorn on
127.0.0.1, a free port) over the demo model and adapters, driven by the official `openai` client
and raw HTTP, compared against the offline API, plus one short `bench serve` run against it."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
from moelora.demo.assets import build_demo_assets
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ServerProcess
from server_harness import server_env as _env

API_KEY = "test-key"
BASE = "tiny-mixtral"
STATIC = ["poet", "coder", "chef", "pirate"]  # "lawyer" is loaded at run time
MAX_MODEL_LEN = 1024


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model_dir, adapters = build_demo_assets(str(root))
    return str(root), model_dir, adapters


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    root, model_dir, adapters = assets
    args = [model_dir, "--served-model-name", BASE, "--api-key", API_KEY, "--device", "cpu",
            "--lora-modules", *[f"{n}={adapters[n]}" for n in STATIC],
            "--enable-runtime-lora-updating",
            "--allowed-lora-dirs", os.path.join(root, "adapters"),
            "--max-loras", "4", "--max-lora-rank", "16", "--max-cpu-loras", "8",
            "--max-num-seqs", "64", "--max-num-batched-tokens", "1024",
            "--max-model-len", str(MAX_MODEL_LEN)]
    proc = ServerProcess(args, _env(), str(tmp_path_factory.mktemp("logs") / "server.log"))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def offline(assets):
    from moelora import LLM

    _, model_dir, _ = assets
    return LLM(model=model_dir, device="cpu", enable_lora=True, max_lora_rank=16, max_loras=4,
               max_cpu_loras=8, max_model_len=MAX_MODEL_LEN)


def _auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def _metrics(server) -> dict:
    """{(name, frozenset(labels)): value} of every sample /metrics serves."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def _wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = _metrics(server)
        if (_value(samples, "moelora:pool_pages", kind="kv") == 0 and
                _value(samples, "moelora:num_requests_running") == 0 and
                _value(samples, "moelora:num_requests_waiting") == 0):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout} s: kv pages "
                                 f"{_value(samples, 'moelora:pool_pages', kind='kv')}")
        time.sleep(0.05)


GREEDY = {"temperature": 0.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
PROMPT = "The capital of France is"


# -- the tests -------------------------------------------------------------------------------
def test_models_lists_base_and_adapters(client):
    cards = {m.id: m for m in client.models.list().data}
    assert BASE in cards and cards[BASE].parent is None
    for name in STATIC:
        assert cards[name].parent == BASE


def test_adapter_selection_matches_offline_api(client, offline, assets):
    from moelora import LoRARequest, SamplingParams

    _, _, adapters = assets
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    texts = {}
    for i, name in enumerate([None, "poet", "coder", "pirate"]):
        served = client.completions.create(model=name or BASE, prompt=PROMPT, **GREEDY)
        lora = LoRARequest(name, i, adapters[name]) if name else None
        (expected,) = offline.generate([PROMPT], params, lora_request=lora, use_tqdm=False)
        assert served.choices[0].text == expected.outputs[0].text, name
        assert served.usage.completion_tokens == 8
        assert served.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert served.choices[0].finish_reason == "length"
        texts[name] = served.choices[0].text
    assert len(set(texts.values())) == len(texts), "adapters must change the output"

    messages = [{"role": "user", "content": "Write a poem."}]
    chat = client.chat.completions.create(model="coder", messages=messages, **GREEDY)
    (expected,) = offline.chat(messages, params, lora_request=LoRARequest("coder", 2,
                                                                          adapters["coder"]),
                               use_tqdm=False)
    assert chat.choices[0].message.content == expected.outputs[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streaming_with_usage(client):
    full = client.completions.create(model="poet", prompt=PROMPT, **GREEDY).choices[0].text
    chunks = list(client.completions.create(model="poet", prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="chef", messages=messages,
                                          **GREEDY).choices[0].message.content
    chunks = list(client.chat.completions.create(model="chef", messages=messages, stream=True,
                                                 stream_options={"include_usage": True},
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 8
    # Without include_usage there is no usage chunk.
    plain = list(client.chat.completions.create(model="chef", messages=messages, stream=True,
                                                **GREEDY))
    assert all(c.choices for c in plain)


def test_sampling_parameters(client):
    kwargs = {"model": "coder", "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "top_p": 0.9,
                  "n": 3, "seed": 1234, "extra_body": {"top_k": 20, "ignore_eos": True}}
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]  # seeded
    assert first.usage.completion_tokens == 18
    # A batch of prompts gives prompt-major choice indices.
    batch = client.completions.create(model=BASE, prompt=["a", "b"], n=2, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy
    # Token-id prompts.
    ids = client.completions.create(model=BASE, prompt=[5, 6, 7], **GREEDY)
    assert ids.usage.prompt_tokens == 3


def test_stop_strings(client):
    full = client.completions.create(model=BASE, prompt=PROMPT, temperature=0.0, max_tokens=24,
                                     extra_body={"ignore_eos": True}).choices[0].text
    candidates = [ch for ch in full[2:] if ch.isprintable() and ch != "\ufffd" and ch.strip()]
    if not candidates:
        pytest.skip("greedy output has no printable character to stop on")
    stop = candidates[0]
    expected = full[:full.index(stop)]
    out = client.completions.create(model=BASE, prompt=PROMPT, temperature=0.0, max_tokens=24,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=BASE, prompt=PROMPT, temperature=0.0,
                                         max_tokens=24, stop=stop, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_logprobs(client):
    out = client.completions.create(model="poet", prompt=PROMPT, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(x <= 0.0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(abs(max(top.values()) - x) < 1e-4 for top, x in zip(lp.top_logprobs,
                                                                  lp.token_logprobs))
    by_id = client.completions.create(model="poet", prompt=PROMPT, logprobs=3,
                                      **{**GREEDY, "extra_body": {
                                          "ignore_eos": True,
                                          "return_tokens_as_token_ids": True}})
    lp = by_id.choices[0].logprobs
    assert all(t.startswith("token_id:") for t in lp.tokens)
    assert all(len(top) == 3 and lp.tokens[i] == max(top, key=top.get)
               for i, top in enumerate(lp.top_logprobs))
    chat = client.chat.completions.create(model="poet", messages=[{"role": "user",
                                                                   "content": "x"}],
                                          logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 8 and all(len(c.top_logprobs) == 2 for c in content)
    streamed = client.chat.completions.create(model="poet", messages=[{"role": "user",
                                                                       "content": "x"}],
                                              logprobs=True, stream=True, **GREEDY)
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([c.logprob for c in content])


def test_64_concurrent_streams_over_4_adapters(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                    max_retries=0, timeout=120)

        async def one(i: int):
            model = STATIC[i % 4]
            stream = await client.completions.create(
                model=model, prompt=f"request {i}:", max_tokens=8, temperature=0.0,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            text, usage, finish = "", None, None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    usage = chunk.usage
            return model, text, usage, finish

        try:
            return await asyncio.gather(*[one(i) for i in range(64)])
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == 64
    for model, _, usage, finish in results:
        assert usage is not None and usage.completion_tokens == 8, model
        assert finish == "length"
    _wait_idle(server)


def test_load_and_unload_while_traffic_runs(server, client, assets, tmp_path):
    root, _, adapters = assets
    results, errors = [], []

    def traffic(model: str, count: int):
        try:
            for i in range(count):
                out = client.completions.create(model=model, prompt=f"t{i}", max_tokens=16,
                                                temperature=0.0,
                                                extra_body={"ignore_eos": True})
                results.append((model, out.usage.completion_tokens,
                                out.choices[0].finish_reason))
        except Exception as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=traffic, args=(m, 3)) for m in ("poet", "chef")]
    for t in threads:
        t.start()
    url = server.url + "/v1/load_lora_adapter"
    loaded = httpx.post(url, json={"lora_name": "lawyer", "lora_path": adapters["lawyer"]},
                        headers=_auth(), timeout=60)
    assert loaded.status_code == 200, loaded.text
    lawyer = client.completions.create(model="lawyer", prompt=PROMPT, **GREEDY)
    assert lawyer.usage.completion_tokens == 8
    assert "lawyer" in {m.id for m in client.models.list().data}
    again = httpx.post(url, json={"lora_name": "lawyer", "lora_path": adapters["lawyer"]},
                       headers=_auth(), timeout=60)
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"

    # Unload an adapter with a long request of it in flight: the request finishes intact.
    inflight = {}

    def long_request():
        inflight["out"] = client.completions.create(model="chef", prompt="long", max_tokens=400,
                                                    temperature=0.0,
                                                    extra_body={"ignore_eos": True})

    runner = threading.Thread(target=long_request)
    runner.start()
    deadline = time.monotonic() + 10
    while "chef" not in _running_adapters(server) and time.monotonic() < deadline:
        time.sleep(0.02)
    unload = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "chef"},
                        headers=_auth(), timeout=60)
    assert unload.status_code == 200, unload.text
    assert "after its requests in flight finished" in unload.text
    runner.join(60)
    assert inflight["out"].usage.completion_tokens == 400
    assert inflight["out"].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="chef", prompt=PROMPT, **GREEDY)
    for t in threads:
        t.join(60)
    assert not [e for e in errors if not isinstance(e, openai.NotFoundError)], errors
    assert all(n == 16 and f == "length" for _, n, f in results)

    # Reload it (same name, same path) and unload the runtime one.
    reload = httpx.post(url, json={"lora_name": "chef", "lora_path": adapters["chef"]},
                        headers=_auth(), timeout=60)
    assert reload.status_code == 200, reload.text
    assert client.completions.create(model="chef", prompt=PROMPT, **GREEDY).usage
    gone = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "lawyer"},
                      headers=_auth(), timeout=60)
    assert gone.status_code == 200
    missing = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "lawyer"},
                         headers=_auth(), timeout=60)
    assert missing.status_code == 404

    # Loads outside --allowed-lora-dirs, of missing or of broken adapters are refused.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    refused = httpx.post(url, json={"lora_name": "x", "lora_path": str(outside)},
                         headers=_auth(), timeout=60)
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "lora_path"
    missing = httpx.post(url, json={"lora_name": "x",
                                    "lora_path": os.path.join(root, "adapters", "nope")},
                         headers=_auth(), timeout=60)
    assert missing.status_code == 404
    broken = os.path.join(root, "adapters", "broken")
    os.makedirs(broken, exist_ok=True)
    with open(os.path.join(broken, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}, f)
    bad = httpx.post(url, json={"lora_name": "broken", "lora_path": broken}, headers=_auth(),
                     timeout=60)
    assert bad.status_code == 400, bad.text
    assert "broken" not in {m.id for m in client.models.list().data}
    _wait_idle(server)


def _running_adapters(server) -> set[str]:
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "moelora:lora_requests_info":
                return set(filter(None, sample.labels["running_lora_adapters"].split(",")))
    return set()


def test_client_disconnect_frees_pages(server):
    _wait_idle(server)
    before = _value(_metrics(server), "moelora:e2e_request_latency_seconds_count")
    body = {"model": "poet", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=_auth(),
                      timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # the request is running; hang up
    samples = _wait_idle(server, timeout=5.0)
    # A non-streaming request whose client times out is aborted too.
    body.pop("stream")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, headers=_auth(), timeout=0.5)
    samples = _wait_idle(server, timeout=5.0)
    assert time.monotonic() - started < 12
    # Neither request ran to its end.
    assert _value(samples, "moelora:e2e_request_latency_seconds_count") == before


def test_tokenize_and_detokenize(server, offline):
    tokenizer = offline.get_tokenizer()
    got = httpx.post(server.url + "/tokenize", json={"model": BASE, "prompt": "Hello there"})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["tokens"] == tokenizer.encode("Hello there")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    back = httpx.post(server.url + "/detokenize", json={"model": STATIC[0],
                                                        "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"] == tokenizer.decode(body["tokens"])
    for path, payload, status, param in (
            ("/tokenize", {"prompt": "x", "messages": messages}, 400, "prompt"),
            ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
            ("/detokenize", {"tokens": [10 ** 9]}, 400, "tokens"),
            ("/detokenize", {"tokens": []}, 400, "tokens")):
        response = httpx.post(server.url + path, json=payload)
        assert response.status_code == status, (path, payload, response.text)
        assert response.json()["error"]["param"] == param


def test_auth(server):
    for path in ("/v1/models",):
        assert httpx.get(server.url + path).status_code == 401
        wrong = httpx.get(server.url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == 401
    no_key = httpx.post(server.url + "/v1/completions", json={"model": BASE, "prompt": "x"})
    assert no_key.status_code == 401
    assert httpx.post(server.url + "/v1/load_lora_adapter",
                      json={"lora_name": "a", "lora_path": "/"}).status_code == 401
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/health", "/version", "/metrics"):  # outside /v1: open, as in vLLM
        assert httpx.get(server.url + path).status_code == 200


ERROR_CASES = [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
     404, "model"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1], "a"]}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x" * (MAX_MODEL_LEN + 10)}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3.0}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1.0}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1.0}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 1100}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template": "{{ x }}"}, 400, "chat_template"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ x }}"},
     400, "chat_template"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"chat_template": "{{ x }}"}}, 400,
     "chat_template"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1" * 5000: 1.0}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 1000.0}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/load_lora_adapter", {"lora_name": ""}, 400, "lora_name"),
]


@pytest.mark.parametrize("path,body,status,param", ERROR_CASES)
def test_error_paths(server, path, body, status, param):
    response = httpx.post(server.url + path, json=body, headers=_auth(), timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    assert error["param"] == param


def test_malformed_requests_never_crash(server, client):
    h = {**_auth(), "content-type": "application/json"}
    for raw in (b"not json", b"[1, 2]", b"", b"\xff\xfe", b'{"prompt": {"a": 1}}', b"null"):
        response = httpx.post(server.url + "/v1/completions", content=raw, headers=h)
        assert response.status_code == 400, raw
        assert response.json()["error"]["code"] == 400
    unknown = httpx.get(server.url + "/v1/nothing", headers=_auth())
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == 404
    wrong_method = httpx.get(server.url + "/v1/completions", headers=_auth())
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="x", temperature=-3)
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.completions.create(model=BASE, prompt="still alive", **GREEDY).usage


def test_metrics_content(server, client):
    client.completions.create(model="pirate", prompt=PROMPT, **GREEDY)
    samples = _metrics(server)
    names = {name for name, _ in samples}
    for metric in ("num_requests_running", "num_requests_waiting", "num_preemptions_total",
                   "prompt_tokens_total", "generation_tokens_total", "kv_cache_usage_perc",
                   "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_count",
                   "inter_token_latency_seconds_count", "e2e_request_latency_seconds_sum",
                   "request_queue_time_seconds_count", "lora_load_seconds_count",
                   "lora_load_bytes_total", "lora_adapters", "pool_pages",
                   "prefix_cache_queries_total", "prefix_cache_hits_total"):
        assert "moelora:" + metric in names, metric
    assert _value(samples, "moelora:generation_tokens_total") >= 8
    assert _value(samples, "moelora:prompt_tokens_total") > 0
    assert _value(samples, "moelora:time_to_first_token_seconds_count") >= 1
    assert _value(samples, "moelora:lora_load_seconds_count") >= 1
    assert _value(samples, "moelora:lora_load_bytes_total") > 0
    assert _value(samples, "moelora:lora_adapters", tier="device") >= 1
    for tier in ("device", "host", "disk"):
        assert ("moelora:lora_adapters", frozenset({("tier", tier)})) in samples
    pages = {kind: _value(samples, "moelora:pool_pages", kind=kind)
             for kind in ("kv", "adapter", "free")}
    assert pages["adapter"] > 0 and pages["free"] > 0
    assert 0.0 <= _value(samples, "moelora:kv_cache_usage_perc") <= 1.0


def test_bench_serve_against_the_server(server, tmp_path, capsys):
    pytest.importorskip("aiohttp")
    pytest.importorskip("matplotlib")
    from moelora.bench import serve as bench

    args = bench.add_cli_args(__import__("argparse").ArgumentParser()).parse_args([
        "--base-url", server.url, "--api-key", API_KEY, "--num-prompts", "12",
        "--request-rate", "40", "--random-input-len", "8", "--random-output-len", "4",
        "--lora-modules", "poet", "coder", "pirate", "--lora-popularity", "zipf",
        "--result-dir", str(tmp_path), "--save-result", "--plot", str(tmp_path / "p.png"),
        "--disable-tqdm"])
    summary = bench.run(args)
    printed = capsys.readouterr().out
    for line in ("Successful requests:", "Failed requests:", "Benchmark duration (s):",
                 "Request throughput (req/s):", "Output token throughput (tok/s):",
                 "Total Token throughput (tok/s):", "Mean TTFT (ms):", "Median TTFT (ms):",
                 "P99 TTFT (ms):", "Mean TPOT (ms):", "Mean ITL (ms):", "P99 E2EL (ms):"):
        assert line in printed, line
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 12 * 4
    saved = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    assert len(saved) == 1
    with open(tmp_path / saved[0]) as f:
        assert json.load(f)["completed"] == 12
    assert (tmp_path / "p.png").stat().st_size > 1000


def _post_expecting_timeout(url: str, body: dict) -> None:
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url, json=body, timeout=1.5)


def test_overload_and_demo_server(tmp_path):
    """A --demo server with one sequence slot and one waiting slot: the third request gets
    503 with Retry-After; runtime adapter updates are off there."""
    env = _env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = ServerProcess(["--demo", "--device", "cpu", "--max-num-seqs", "1",
                          "--max-waiting-requests", "1", "--max-loras", "2"], env,
                         str(tmp_path / "demo.log"))
    try:
        proc.wait_ready()
        models = httpx.get(proc.url + "/v1/models").json()["data"]
        assert {m["id"] for m in models} >= {"tiny-mixtral", "poet", "lawyer"}
        body = {"model": "poet", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0.0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", proc.url + "/v1/completions", json=body,
                          timeout=60) as first:
            lines = first.iter_lines()  # kept alive: closing the iterator hangs up
            next(line for line in lines if line.startswith("data: {"))
            waiting = threading.Thread(target=_post_expecting_timeout, daemon=True,
                                       args=(proc.url + "/v1/completions",
                                             {**body, "stream": False}))
            waiting.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if _value(_metrics(proc), "moelora:num_requests_waiting") >= 1:
                    break
                time.sleep(0.02)
            third = httpx.post(proc.url + "/v1/completions", json=body, timeout=30)
            assert third.status_code == 503, third.text
            assert third.headers["retry-after"] == "1"
            assert third.json()["error"]["code"] == 503
        disabled = httpx.post(proc.url + "/v1/load_lora_adapter",
                              json={"lora_name": "a", "lora_path": "/tmp"})
        assert disabled.status_code == 404
        waiting.join(5)
        _wait_idle(proc, timeout=10)
    finally:
        proc.stop()
