"""AsyncEngine over the real LLMEngine (demo model and adapters): streaming, aborts that free
pages at once, adapter unloads deferred until requests in flight finish, bad input refused
before anything streams, and a new adapter registered while the engine keeps stepping."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from moelora.engine import adapters as adapter_module
from moelora.engine.adapters import LoRARequest
from moelora.engine.async_engine import AdapterUnavailableError, AsyncEngine
from moelora.engine.config import EngineConfig
from moelora.engine.llm_engine import LLMEngine
from moelora.engine.sampling_params import SamplingParams


def _engine(model_dir: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model_dir, device="cpu", enable_lora=True,
                                  max_lora_rank=16, max_loras=2, max_cpu_loras=5,
                                  max_model_len=256, max_num_seqs=8))


def _run(engine: LLMEngine, body):
    """Runs `body(async_engine)` with a started AsyncEngine, then shuts it down."""

    async def main():
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            return await body(async_engine)
        finally:
            async_engine.shutdown()

    return asyncio.run(main())


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_streams_are_cumulative_and_end_finished(assets):
    model_dir, adapters = assets
    poet = LoRARequest("poet", 1, adapters["poet"])

    async def body(engine: AsyncEngine):
        async def collect(request_id, lora):
            stream = await engine.add_request(request_id, "Hello there", _greedy(6), lora)
            seen = [output async for output in stream]
            lengths = [len(o.outputs[0].token_ids) for o in seen]
            assert lengths == sorted(lengths) and lengths[-1] == 6
            assert seen[-1].finished and not any(o.finished for o in seen[:-1])
            return seen[-1].outputs[0].token_ids

        base, adapted = await asyncio.gather(collect("a", None), collect("b", poet))
        assert base != adapted
        await _until(lambda: engine.snapshot.in_flight == 0)
        assert engine.snapshot.pool["kv_pages"] == 0

    _run(_engine(model_dir), body)


def test_closing_a_stream_aborts_and_frees_pages(assets):
    model_dir, _ = assets

    async def body(engine: AsyncEngine):
        stream = await engine.add_request("long", "Once upon a time", _greedy(200))
        first = await stream.__anext__()
        assert not first.finished
        await _until(lambda: engine.snapshot.pool["kv_pages"] > 0)
        stream.close()
        await _until(lambda: engine.snapshot.pool["kv_pages"] == 0 and
                     engine.snapshot.in_flight == 0, timeout=2.0)
        assert engine.snapshot.num_running == 0

        # Cancelling the consumer (what a client disconnect does) aborts too.
        stream = await engine.add_request("cancelled", "Once upon a time", _greedy(200))

        async def consume():
            async for _ in stream:
                pass

        task = asyncio.ensure_future(consume())
        await _until(lambda: engine.snapshot.pool["kv_pages"] > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stream.close()  # what the server's cleanup does
        await _until(lambda: engine.snapshot.pool["kv_pages"] == 0, timeout=2.0)

    _run(_engine(model_dir), body)


def test_unload_waits_for_requests_in_flight(assets):
    model_dir, adapters = assets
    chef = LoRARequest("chef", 3, adapters["chef"])

    async def body(engine: AsyncEngine):
        await engine.load_adapter(chef)
        stream = await engine.add_request("r", "Soup", _greedy(40), chef)
        await stream.__anext__()
        unload = asyncio.ensure_future(engine.unload_adapter("chef"))
        await asyncio.sleep(0.05)
        with pytest.raises(AdapterUnavailableError):
            await engine.add_request("refused", "Soup", _greedy(4), chef)
        with pytest.raises(AdapterUnavailableError):
            await engine.load_adapter(chef)
        outputs = [o async for o in stream]
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 40
        assert outputs[-1].outputs[0].finish_reason == "length"
        assert await unload is True  # it had to wait
        names = await engine.call(lambda: [r.lora_name for r in engine.engine.adapters.loaded()])
        assert "chef" not in names
        # With nothing in flight the unload is immediate; the name can be loaded again.
        await engine.load_adapter(chef)
        assert await engine.unload_adapter("chef") is False
        with pytest.raises(KeyError):
            await engine.unload_adapter("chef")

    _run(_engine(model_dir), body)


def test_bad_input_is_refused_before_streaming(assets):
    model_dir, adapters = assets

    async def body(engine: AsyncEngine):
        with pytest.raises(ValueError):
            await engine.add_request("ids", {"prompt_token_ids": [10 ** 6]}, _greedy(4))
        with pytest.raises(ValueError):
            await engine.add_request("long", {"prompt_token_ids": [1] * 300}, _greedy(4))
        with pytest.raises(TypeError):
            await engine.add_request("type", 3.5, _greedy(4))
        with pytest.raises(Exception):  # noqa: B017 - AdapterError or a validation error
            await engine.add_request("adapter", "x", _greedy(4),
                                     LoRARequest("ghost", 9, adapters["poet"] + "-missing"))
        assert engine.snapshot.in_flight == 0 and not engine._streams
        stream = await engine.add_request("ok", "still fine", _greedy(3))
        assert [o async for o in stream][-1].finished

    _run(_engine(model_dir), body)


def test_a_new_adapter_registers_while_the_engine_steps(assets, monkeypatch):
    """A first request parses its adapter's files on a worker thread: the engine thread keeps
    running other requests' steps meanwhile (here the parse is slowed to 0.5 s)."""
    model_dir, adapters = assets
    parsed_on = []
    parse = adapter_module.load_adapter_plan

    def slow_parse(*args, **kwargs):
        parsed_on.append(threading.current_thread().name)
        time.sleep(0.5)
        return parse(*args, **kwargs)

    monkeypatch.setattr(adapter_module, "load_adapter_plan", slow_parse)
    poet = LoRARequest("poet", 1, adapters["poet"])

    async def body(engine: AsyncEngine):
        base = await engine.add_request("base", "Hello there", _greedy(200))
        arrivals = []

        async def drain():
            async for _ in base:
                arrivals.append(time.monotonic())

        drainer = asyncio.ensure_future(drain())
        await _until(lambda: len(arrivals) > 0)
        start = time.monotonic()
        stream = await engine.add_request("adapted", "Hello there", _greedy(4), poet)
        meanwhile = sum(start <= t <= time.monotonic() for t in arrivals)
        assert parsed_on and "moelora-engine" not in parsed_on
        assert meanwhile >= 5, meanwhile  # the base request kept getting tokens
        assert [o async for o in stream][-1].finished
        again = await engine.add_request("again", "Hi", _greedy(2), poet)  # registered: no parse
        assert [o async for o in again][-1].finished and len(parsed_on) == 1
        engine.abort("base")
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)

    _run(_engine(model_dir), body)
