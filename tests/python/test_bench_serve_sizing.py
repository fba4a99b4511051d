"""`moelora bench serve` without --tokenizer sizes its prompts with the server's /tokenize, so a
prompt is as long as asked (random words are ~5 tokens each for the demo's byte-level tokenizer),
and saves strict JSON; `moelora bench serve-synthetic` runs the whole vllm-shaped run against a
synthetic model, whose tokenizer (synthetic_tokenizer.py) round-trips text exactly.
Real servers on loopback (the server tests' fixtures)."""

from __future__ import annotations

import argparse
import json
import random

import pytest
from moelora.bench import serve as bench
from moelora.bench.serve_prompts import random_prompt

pytest.importorskip("aiohttp")
httpx = pytest.importorskip("httpx")
import test_server as server_tests  # skipped above without the server's packages

# `moelora serve` on the demo model and adapters, as the server tests start it
assets, server, API_KEY = server_tests.assets, server_tests.server, server_tests.API_KEY


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def _count(server, text: str) -> int:
    response = httpx.post(server.url + "/tokenize", json={"prompt": text},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()["count"]


def test_prompts_are_as_long_as_asked(server, tmp_path, capsys):
    words = random_prompt(random.Random(0), 16)  # the sizing without a tokenizer
    assert _count(server, words) > 3 * 16
    args = bench.add_cli_args(argparse.ArgumentParser()).parse_args([
        "--base-url", server.url, "--api-key", API_KEY, "--num-prompts", "6",
        "--random-input-len", "16", "--random-output-len", "3", "--random-range-ratio", "0.5",
        "--lora-modules", "poet", "coder", "--result-dir", str(tmp_path),
        "--result-filename", "r.json", "--disable-tqdm"])
    summary = bench.run(args)
    assert summary["prompt_sizing"] == "server /tokenize"
    assert summary["failed"] == 0
    # every prompt has exactly the length drawn for it: 8..24 tokens around 16
    lengths = summary["input_lens"]
    assert all(8 <= n <= 24 for n in lengths) and len(set(lengths)) > 1
    saved = _strict((tmp_path / "r.json").read_text())
    assert saved["input_lens"] == lengths and saved["request_rate"] == "inf"
    printed = capsys.readouterr().out
    assert "prompts sized by: server /tokenize" in printed
    assert "poet" in printed and "coder" in printed  # the per-adapter lines


def test_serve_synthetic_runs_the_vllm_shaped_run(tmp_path, monkeypatch):
    from moelora.cli import main

    pytest.importorskip("matplotlib")
    env = server_tests._env()  # the server process imports this moelora, one thread per op
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    monkeypatch.setenv("OMP_NUM_THREADS", env["OMP_NUM_THREADS"])
    out = tmp_path / "e2e.jsonl"
    assert main(["bench", "serve-synthetic", "--model", "synthetic:tiny-moe", "--device", "cpu",
                 "--num-prompts", "4", "--max-concurrency", "2", "--random-input-len", "12",
                 "--random-output-len", "6", "--warmup-prompts", "2", "--num-adapters", "2",
                 "--work-dir", str(tmp_path / "work"), "--result-dir", str(tmp_path / "res"),
                 "--out", str(out), "--plot"]) == 0
    record = _strict(out.read_text().splitlines()[-1])
    assert record["bench"] == "serve" and record["num_seqs"] == 2 and record["num_adapters"] == 2
    assert record["completed"] == 4 and record["failed"] == 0
    assert record["prompt_sizing"] == "server /tokenize" and record["output_tokens_per_s"] > 0
    saved = _strict((tmp_path / "res" / "serve-tiny-moe-2adapters-c2-12in-6out.json").read_text())
    assert saved["input_lens"] == [12] * 4 and saved["output_lens"] == [6] * 4
    assert set(saved["per_adapter"]) == {"a0", "a1"}
    assert (tmp_path / "res" / "serve-tiny-moe-2adapters-c2-12in-6out.png").exists()


def test_synthetic_tokenizer_round_trips_text(tmp_path):
    from moelora.bench.synthetic_tokenizer import write_synthetic_tokenizer
    from moelora.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(write_synthetic_tokenizer(str(tmp_path), 1024))
    assert tokenizer.vocab_size == 1024
    text = random_prompt(random.Random(1), 40)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text and len(ids) == (len(text) + 1) // 2
    assert tokenizer.encode(tokenizer.decode(ids[:7]), add_special_tokens=False) == ids[:7]
    assert tokenizer.decode([1000]) == "<1000>"  # every id decodes to text
    with pytest.raises(ValueError, match="at least 757"):
        write_synthetic_tokenizer(str(tmp_path / "small"), 100)
