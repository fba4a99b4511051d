"""The server's small parts on their own: byte counts as vLLM reads them, the flags `moelora
serve` takes, the missing-benchmark-extra message, strict body parsing, path-free messages and
finite logprobs."""

from __future__ import annotations

import argparse
import json
import math

import pytest

pytest.importorskip("fastapi")
from moelora import cli
from moelora.entrypoints.openai.cli_args import add_cli_args, memory_bytes
from moelora.entrypoints.openai.errors import APIError, client_safe, error_body
from moelora.entrypoints.openai.logprobs import LOGPROB_FLOOR, finite_logprob
from moelora.entrypoints.openai.request_body import (
    lone_surrogate_path,
    parse_json_object,
)


@pytest.mark.parametrize("text,expected", [
    ("536870912", 536870912), ("512MiB", 512 << 20), ("2G", 2 << 30), ("2g", 2 * 10 ** 9),
    ("1k", 1000), ("1K", 1024), ("25.6k", 25600), ("1.5GB", 1_500_000_000),
    ("2GiB", 2 << 30), ("3 MB", 3_000_000), ("1e9", 10 ** 9)])
def test_memory_bytes(text, expected):
    assert memory_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "x", "-5", "0", "1.5.2", "5 XB", "1e40"])
def test_memory_bytes_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        memory_bytes(text)


def test_serve_flags():
    args = add_cli_args(argparse.ArgumentParser()).parse_args([
        "m", "--kv-cache-memory-bytes", "64MiB", "--shutdown-timeout", "7.5",
        "--trust-request-chat-template", "--max-request-body-bytes", "1M"])
    assert args.kv_cache_memory_bytes == 64 << 20 and args.shutdown_timeout == 7.5
    assert args.trust_request_chat_template and args.max_request_body_bytes == 1 << 20
    defaults = add_cli_args(argparse.ArgumentParser()).parse_args([])
    assert defaults.kv_cache_memory_bytes is None and not defaults.trust_request_chat_template
    assert defaults.max_request_body_bytes == 4 << 20 and defaults.shutdown_timeout == 20.0


def test_bench_serve_without_its_extra_prints_the_pip_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "missing_modules", lambda names: list(names))
    assert cli.main(["bench", "serve", "--plot"]) == 2
    err = capsys.readouterr().err
    assert "pip install aiohttp matplotlib" in err and "needs aiohttp and matplotlib" in err
    assert "Traceback" not in err


def test_lone_surrogates_are_found_and_pairs_are_not():
    assert parse_json_object(b'{"a": "\\ud83d\\ude00", "b": ["\\u00e9"]}') == {
        "a": "\U0001f600", "b": ["\u00e9"]}
    for body, where in ((b'{"prompt": "\\ud800"}', "prompt"),
                        (b'{"messages": [{"content": [{"text": "a\\udfffb"}]}]}',
                         "messages.0.content.0.text"),
                        (b'{"logit_bias": {"\\udc00": 1}}', "logit_bias.\ufffd"),
                        (b'{"x": [1, 2, {"y": "\\uD834"}]}', "x.2.y")):
        with pytest.raises(APIError) as caught:
            parse_json_object(body)
        assert caught.value.status == 400 and caught.value.param == where, body
        json.dumps(caught.value.body(), ensure_ascii=False).encode("utf-8")  # sendable
    deep = [0]
    for _ in range(20_000):  # 20 times what json.loads accepts
        deep = [deep]
    assert lone_surrogate_path({"a": deep}) is None  # iterative: no RecursionError


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a": NaN}',
                                  b'{"a": -Infinity}', b"[1]", b"\xff", b'{"a": 1} x'])
def test_bodies_that_are_not_a_strict_json_object(body):
    with pytest.raises(APIError) as caught:
        parse_json_object(body)
    assert caught.value.status == 400


def test_messages_never_carry_server_paths():
    message = ("adapter 'fr': cannot open '/srv/models/adapters/fr/adapter_model.safetensors': "
               "No such file; see /etc/moelora/ and C:/x, alpha/r = 2, 1/2, "
               "http://host/path/x")
    safe = client_safe(message)
    assert "/srv" not in safe and "/etc" not in safe
    assert "'adapter_model.safetensors'" in safe and "moelora" in safe
    assert "alpha/r = 2, 1/2" in safe and "http://host/path/x" in safe
    assert error_body(500, message)["error"]["message"] == safe


def test_logprobs_are_finite():
    assert finite_logprob(-1.5) == -1.5 and finite_logprob(None) is None
    assert finite_logprob(float("-inf")) == LOGPROB_FLOOR == -9999.0
    assert finite_logprob(float("nan")) == LOGPROB_FLOOR
    assert math.isfinite(finite_logprob(float("inf")))
