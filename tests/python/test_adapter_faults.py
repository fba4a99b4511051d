"""Adapters that go wrong, through the whole engine on the CPU: NaN / Inf weights, files that
vanish, shrink or are rewritten after registration (before the first read, or after the
adapter was served and evicted from both tiers), adapter_config.json and safetensors headers
nested 200,000 levels deep, hostile rank_pattern keys, and registrations racing on threads.

Each fault stays with its adapter: preload raises AdapterValidationError naming the adapter and
the tensor or file (never a server directory), a failed adapter is not listed by loaded(), its
requests finish with finish_reason "error" and error_type "adapter_error", every other request
completes, the adapter can be unloaded and loaded again, and the pool's page accounts and pins
are exact afterwards."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from moelora import _C, LLM, AdapterValidationError, LoRARequest, SamplingParams
from moelora.bench.synthetic_adapters import write_random_adapter
from safetensors.torch import load_file, save_file

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
PROMPT = {"prompt_token_ids": [3, 14, 15, 92, 65]}


def make_llm(**overrides) -> LLM:
    options = {"model": "synthetic:tiny-moe", "device": "cpu", "enable_lora": True,
               "max_lora_rank": 8, "max_loras": 2, "max_cpu_loras": 4,
               "pool_memory_bytes": 32 << 20, "seed": 0}
    options.update(overrides)
    return LLM(**options)


def edit_config(adapter_dir, **changes) -> None:
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def write_adapter(llm: LLM, path, seed: int = 0, rank: int = 4) -> str:
    return write_random_adapter(str(path), llm.llm_engine.model.lora_sites(), rank, seed=seed,
                                dtype=torch.float32)


def poison(adapter_dir, value: float) -> str:
    """Puts `value` into one element of the adapter's first tensor; returns that tensor's key."""
    file = os.path.join(adapter_dir, "adapter_model.safetensors")
    tensors = load_file(file)
    key = min(tensors)
    tensors[key].view(-1)[7] = value
    save_file(tensors, file)
    return key


def accounts(llm: LLM) -> dict:
    """The pool's accounts that must come back exactly after any fault: KV pages and owners,
    pinned adapter pages, and free + adapter pages (adapters stay resident, legitimately)."""
    engine = llm.llm_engine
    stats = engine.memory.pool.stats()
    engine.memory.pool.check_invariants()
    resident = sum(engine.adapters.num_pages(engine.adapters.resolve(r))
                   for r in engine.adapters.loaded()
                   if engine.adapters.ready(engine.adapters.resolve(r)))
    assert stats["adapter_pages"] == resident, "pages held by adapters that are not resident"
    return {"kv_pages": stats["kv_pages"], "kv_owners": stats["kv_owners"],
            "pinned_adapter_pages": stats["pinned_adapter_pages"],
            "free_or_adapter": stats["free_pages"] + stats["adapter_pages"],
            "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting)}


def assert_path_free(message: str, tmp_path) -> None:
    assert str(tmp_path) not in message, f"server path in a client message: {message}"


@pytest.fixture(scope="module")
def llm():
    with make_llm() as engine:
        yield engine


def test_nan_and_inf_weights_are_refused_at_preload_naming_the_tensor(llm, tmp_path):
    start = accounts(llm)
    adapters = llm.llm_engine.adapters
    for value, word in ((float("nan"), "NaN"), (float("-inf"), "Inf")):
        directory = write_adapter(llm, tmp_path / f"bad_{word}")
        key = poison(directory, value)
        request = LoRARequest(f"bad_{word}", 1, directory)
        with pytest.raises(AdapterValidationError, match=rf"'bad_{word}'.*'{key}' holds {word}"
                           ) as caught:
            adapters.preload(request)
        assert_path_free(str(caught.value), tmp_path)
        assert request.lora_name not in [r.lora_name for r in adapters.loaded()]
        # Sent with requests instead: only its requests fail, with the same words.
        good = LoRARequest("good", 2, write_adapter(llm, tmp_path / "good", seed=1))
        outs = llm.generate([PROMPT, PROMPT, PROMPT], PARAMS, [good, request, None],
                            use_tqdm=False)
        failed = outs[1].outputs[0]
        assert failed.finish_reason == "error" and failed.error_type == "adapter_error"
        assert f"holds {word}" in failed.error and key in failed.error
        assert_path_free(failed.error, tmp_path)
        assert [o.outputs[0].finish_reason for o in (outs[0], outs[2])] == ["length", "length"]
        assert outs[0].outputs[0].error_type is None
    assert accounts(llm) == start


@pytest.fixture
def fillers(llm, tmp_path):
    """Adapters never seen before, more than the fixture engine's 2 slots and 4 host copies: a
    request for each pushes any adapter read before them out of both tiers (their copies are
    the more recent)."""
    requests = [LoRARequest(f"{tmp_path.name}-filler{k}", 100 + k,
                            write_adapter(llm, tmp_path / f"filler{k}", seed=50 + k))
                for k in range(5)]
    yield requests
    for request in requests:
        if request.lora_name in [r.lora_name for r in llm.llm_engine.adapters.loaded()]:
            llm.llm_engine.adapters.unload(request.lora_name)


def break_file(file: str, fault: str) -> None:
    original = Path(file).read_bytes()
    if fault == "deleted":
        os.remove(file)
    elif fault == "truncated":
        os.truncate(file, len(original) // 2)
    else:  # same size, other bytes, a later modification time (as every write gives)
        stamp = os.stat(file)
        with open(file, "r+b") as f:
            f.seek(len(original) - 64)
            f.write(b"\x7f" * 64)
        os.utime(file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))


@pytest.mark.parametrize("when", ["before_its_first_read", "after_its_eviction"])
@pytest.mark.parametrize("fault", ["deleted", "truncated", "rewritten"])
def test_a_file_broken_under_a_registered_adapter_fails_its_requests_until_reloaded(
        llm, fillers, tmp_path, fault, when):
    start = accounts(llm)
    adapters = llm.llm_engine.adapters
    name = f"broken_{fault}"
    directory = write_adapter(llm, tmp_path / name, seed=3)
    request = LoRARequest(name, 3, directory)
    adapter_id = adapters.resolve(request)  # registered: header and config checked
    if when == "after_its_eviction":
        # Served once, then pushed out of both tiers: its next request reads the files again.
        assert llm.generate(PROMPT, PARAMS, request, use_tqdm=False)[0].outputs[0] \
            .finish_reason == "length"
        llm.generate([PROMPT] * len(fillers), PARAMS, fillers, use_tqdm=False)
        assert adapters.cache.residency(adapter_id) == _C.Residency.DISK
    file = os.path.join(directory, "adapter_model.safetensors")
    original = Path(file).read_bytes()
    break_file(file, fault)
    # Its requests among others, some of which need loads of their own.
    outs = llm.generate([PROMPT] * 4, PARAMS, [fillers[0], request, None, fillers[1]],
                        use_tqdm=False)
    failed = outs[1].outputs[0]
    assert failed.finish_reason == "error" and failed.error_type == "adapter_error"
    assert f"adapter '{name}'" in failed.error and "adapter_model.safetensors" in failed.error
    assert {"deleted": "is gone", "truncated": "was truncated",
            "rewritten": "changed since"}[fault] in failed.error
    assert_path_free(failed.error, tmp_path)
    assert [outs[k].outputs[0].finish_reason for k in (0, 2, 3)] == ["length"] * 3
    assert name not in [r.lora_name for r in adapters.loaded()]
    assert accounts(llm) == start
    # Still failed for later requests, until unloaded and loaded again from a good file.
    again = llm.generate(PROMPT, PARAMS, request, use_tqdm=False)[0].outputs[0]
    assert again.finish_reason == "error" and f"adapter '{name}'" in again.error
    Path(file).write_bytes(original)
    if fault == "deleted":  # unload, then load
        adapters.unload(name)
    adapters.preload(request)  # a failed adapter is read again from its files
    fixed = llm.generate(PROMPT, PARAMS, request, use_tqdm=False)[0].outputs[0]
    assert fixed.finish_reason == "length" and fixed.error is None
    adapters.unload(name)
    assert accounts(llm) == start


def test_json_nested_200000_levels_is_refused_naming_the_file(llm, tmp_path):
    adapters = llm.llm_engine.adapters
    deep = "[" * 200_000 + "]" * 200_000
    config_dir = write_adapter(llm, tmp_path / "deep_config")
    with open(os.path.join(config_dir, "adapter_config.json"), "w") as f:
        f.write('{"r": 4, "x": ' + deep + "}")
    with pytest.raises(AdapterValidationError, match="adapter_config.json nests JSON deeper"):
        adapters.resolve(LoRARequest("deep_config", 4, config_dir))
    header_dir = write_adapter(llm, tmp_path / "deep_header")
    header = ('{"__metadata__": ' + deep + "}").encode()
    with open(os.path.join(header_dir, "adapter_model.safetensors"), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
    with pytest.raises(AdapterValidationError, match="adapter_model.safetensors .header. nests"):
        adapters.resolve(LoRARequest("deep_header", 5, header_dir))
    # Just inside the bound is fine; one level past it is refused.
    shallow = write_adapter(llm, tmp_path / "shallow")
    edit_config(shallow, note=json.loads("[" * 63 + "]" * 63))
    adapters.resolve(LoRARequest("shallow", 6, shallow))
    edit_config(shallow, note=json.loads("[" * 64 + "]" * 64))
    with pytest.raises(AdapterValidationError, match="deeper than 64"):
        adapters.resolve(LoRARequest("shallow_plus", 7, shallow))
    adapters.unload("shallow")


@pytest.mark.parametrize("key", ["(a+)+$", "(.*)*x", ".*.*.*.*.*.*.*.*.*.*.*.*z", "(q|q)*_",
                                 "([a-z._0-9]{0,30}){30}!"])
def test_a_hostile_rank_pattern_is_matched_in_bounded_time(llm, tmp_path, key):
    directory = write_adapter(llm, tmp_path / "pattern")
    edit_config(directory, rank_pattern={key: 2})
    start = time.monotonic()
    llm.llm_engine.adapters.resolve(LoRARequest("pattern", 8, directory))  # matches nothing
    assert time.monotonic() - start < 1.0
    llm.llm_engine.adapters.unload("pattern")


@pytest.mark.parametrize("key,why", [(r"(a)\1", "back-reference"), ("a{5000}", "too complex"),
                                     ("(?i)q_proj", "flags"), ("(?=q)q_proj", "lookahead")])
def test_rank_pattern_keys_beyond_the_bounds_are_refused(llm, tmp_path, key, why):
    directory = write_adapter(llm, tmp_path / "refused")
    edit_config(directory, rank_pattern={key: 2})
    with pytest.raises(AdapterValidationError, match=why):
        llm.llm_engine.adapters.resolve(LoRARequest("refused", 9, directory))


def test_racing_registrations_from_threads_end_with_one_adapter(llm, tmp_path):
    adapters = llm.llm_engine.adapters
    directory = write_adapter(llm, tmp_path / "raced", seed=5)
    ids, errors = [], []
    barrier = threading.Barrier(6)

    def register():
        barrier.wait()
        try:
            ids.append(adapters.resolve(LoRARequest("raced", 10, directory)))
        except Exception as e:  # noqa: BLE001 - collected and checked below
            errors.append(e)

    threads = [threading.Thread(target=register) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(ids)) == 1
    assert [r.lora_name for r in adapters.loaded()].count("raced") == 1
    adapters.preload(LoRARequest("raced", 10, directory))  # from this thread too
    out = llm.generate(PROMPT, PARAMS, LoRARequest("raced", 10, directory), use_tqdm=False)
    assert out[0].outputs[0].finish_reason == "length"
    adapters.unload("raced")
