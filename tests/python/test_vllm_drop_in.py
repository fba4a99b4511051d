"""A vLLM user's command lines and scripts, as written, against moelora (issue: drop-in for vLLM
users): `vllm serve` flags, VLLM_ALLOW_RUNTIME_LORA_UPDATING, models named by Hugging Face id
from a cache laid out on disk, the port bound before the model loads, one-line errors with exit
status 2, and --help with every default. Real servers on loopback, the official openai client.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import openai
import pytest
from moelora.demo.assets import build_demo_assets
from moelora.hub import is_repo_id, resolve_model
from server_harness import dies_with_this_process, free_port, openai_server, server_env

TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<<assistant>>{% endif %}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model_dir, adapters = build_demo_assets(str(root))
    return str(root), model_dir, adapters


def _serve(args: list[str], env: dict | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    """`moelora serve ARGS` to its end (for the command lines that must exit at once)."""
    argv = [sys.executable, "-m", "moelora.cli", "serve", *args]
    return subprocess.run(dies_with_this_process(argv), check=False,
                          env=server_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def test_a_copied_vllm_command_line_serves(assets, tmp_path):
    _, model_dir, adapters = assets
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    args = ["--model", model_dir, "--served-model-name", "base", "--device", "cpu",
            "--trust-remote-code", "--block-size", "8", "--max-logprobs", "5",
            "--disable-log-requests", "--disable-log-stats", "--chat-template", str(template),
            "--lora-dtype", "auto", "--kv-cache-dtype", "auto", "--enable-lora",
            "--max-lora-rank", "16", "--max-num-seqs", "8", "--max-model-len", "512"]
    env = server_env(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    with openai_server(args, env, str(tmp_path / "server.log"), timeout=60) as (server, client):
        # the environment switch enabled runtime loading, as in vLLM
        loaded = client.post("/load_lora_adapter", cast_to=object,
                             body={"lora_name": "poet", "lora_path": adapters["poet"]})
        assert "poet" in str(loaded)
        chat = client.chat.completions.create(
            model="poet", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            temperature=0.0, logprobs=True, top_logprobs=5)
        assert chat.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.BadRequestError, match="logprobs"):  # --max-logprobs 5
            client.completions.create(model="base", prompt="x", max_tokens=1, logprobs=6)
        # the --chat-template file renders the prompt
        import httpx

        rendered = httpx.post(server.url + "/tokenize", timeout=30, json={
            "model": "base", "messages": [{"role": "user", "content": "hi"}]}).json()
        plain = httpx.post(server.url + "/tokenize", timeout=30, json={
            "model": "base", "prompt": "<<user>>hi<<assistant>>",
            "add_special_tokens": False}).json()
        assert rendered["tokens"][-len(plain["tokens"]):] == plain["tokens"]
    with open(server.log_path) as f:
        assert "--trust-remote-code: accepted" in f.read()


@pytest.mark.parametrize("flags,reason", [
    (["--enable-auto-tool-choice", "--tool-call-parser", "openai"], "not available"),
    (["--enable-auto-tool-choice"], "needs --tool-call-parser"),
    (["--kv-cache-dtype", "fp8"], "fp8 KV caches"),
    (["--block-size", "0"], "--block-size"),
    (["--chat-template", "/no/such/template.jinja"], "--chat-template"),
])
def test_flags_that_cannot_apply_exit_2_with_the_reason(assets, flags, reason):
    _, model_dir, _ = assets
    done = _serve([model_dir, "--device", "cpu", "--port", str(free_port()), *flags])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], done.stderr


def test_a_bad_lora_modules_path_is_one_line_before_the_model_loads(assets, tmp_path):
    _, model_dir, _ = assets
    start = time.monotonic()
    done = _serve([model_dir, "--device", "cpu", "--port", str(free_port()),
                   "--lora-modules", f"x={tmp_path / 'missing'}"])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--lora-modules x=" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and str(tmp_path) in lines[0]  # the user's own path
    assert time.monotonic() - start < 60


def test_an_adapter_that_fails_to_load_at_start_is_one_line(assets, tmp_path):
    _, model_dir, _ = assets
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "target_modules": '
                                             '["q_proj"], "peft_type": "LORA"}')
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    done = _serve([model_dir, "--device", "cpu", "--port", str(free_port()),
                   "--lora-modules", f"bad={bad}"], timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("moelora serve:")]
    assert len(errors) == 1 and "--lora-modules bad" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_a_busy_port_is_reported_before_the_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        start = time.monotonic()
        # a model that would take long to build: the port is checked first
        done = _serve(["synthetic:mixtral-8x7b", "--device", "cpu", "--port", str(port)])
        elapsed = time.monotonic() - start
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert elapsed < 30, elapsed


def test_help_shows_every_default():
    done = subprocess.run([sys.executable, "-m", "moelora.cli", "serve", "--help"],
                          check=False, env=server_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for expected in ("(default: 8000)", "--max-num-seqs", "(default: 64)", "--block-size",
                     "--kv-cache-dtype", "OpenAI-compatible server"):
        assert expected in text, expected
    for command in (["demo"], ["generate"], ["bench", "scale"], ["config"]):
        done = subprocess.run([sys.executable, "-m", "moelora.cli", *command, "--help"],
                              check=False, env=server_env(), capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and "default" in done.stdout, command


# -- models named by Hugging Face id ---------------------------------------------------------
def _hub_cache(root, repo_id: str, model_dir: str) -> str:
    """A Hugging Face cache holding `model_dir` as repo_id's main revision, laid out as
    huggingface_hub writes one (blobs, snapshots/<commit>, refs/main)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    shutil.copytree(model_dir, snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def test_repo_ids_resolve_from_the_cache_without_network(assets, tmp_path, monkeypatch):
    _, model_dir, _ = assets
    snapshot = _hub_cache(str(tmp_path), "acme/tiny-moe", model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_repo_id("acme/tiny-moe") and not is_repo_id("../x") and not is_repo_id("/abs/x")
    assert os.path.samefile(resolve_model("acme/tiny-moe"), snapshot)
    assert resolve_model(model_dir) == model_dir
    assert resolve_model("synthetic:tiny-moe") == "synthetic:tiny-moe"
    with pytest.raises(ValueError, match="acme/absent.*not in the Hugging Face cache"):
        resolve_model("acme/absent")
    with pytest.raises(ValueError, match="no such directory"):
        resolve_model("/no/such/model")

    from moelora import LLM, SamplingParams

    with LLM("acme/tiny-moe", device="cpu", max_num_seqs=2, max_model_len=64) as llm:
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                           SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_serve_takes_a_repo_id(assets, tmp_path):
    _, model_dir, _ = assets
    _hub_cache(str(tmp_path / "hub"), "acme/tiny-moe", model_dir)
    env = server_env(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    args = ["acme/tiny-moe", "--device", "cpu", "--max-num-seqs", "4", "--max-model-len", "256"]
    with openai_server(args, env, str(tmp_path / "server.log"), timeout=60) as (_, client):
        assert [m.id for m in client.models.list().data] == ["acme/tiny-moe"]
