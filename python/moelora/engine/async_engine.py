"""AsyncEngine: the synchronous, single-threaded LLMEngine behind an asyncio interface.

One background thread owns the engine: it alone calls `step()`, `add_request`, `abort_request`
and the adapter manager. Everything else talks to it through a thread-safe command queue:

    asyncio side                            engine thread
    add_request() -> add command      --->  engine.add_request, step(), ...
    RequestStream (an asyncio.Queue)  <---  loop.call_soon_threadsafe(queue.put_nowait, output)

A consumer that stops listening (a client disconnect cancels its generator) aborts its request
at once, which frees its KV pages and unpins its adapter before the next step. Adapters are
unloaded only once no request of theirs is in flight: an unload with requests running is
deferred, and new requests for that adapter are refused meanwhile, so nothing is corrupted.
Loading an adapter (parsing its files, checking and copying its weights) runs in a worker
thread, neither on the event loop nor on the engine thread, so decoding never waits for it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moelora.engine.adapters import LoRARequest
from moelora.engine.request import RequestOutput, now
from moelora.engine.sampling_params import SamplingParams

logger = logging.getLogger("moelora.async_engine")

IDLE_POLL_S = 0.05  # how often an idle engine thread refreshes its snapshot
MAX_CONSECUTIVE_STEP_FAILURES = 3  # after this many failed steps in a row the engine is dead


class EngineDeadError(RuntimeError):
    """The engine thread stopped or its steps keep failing; no request can be served."""


class AdapterUnavailableError(ValueError):
    """The adapter is being unloaded (or is unknown to the engine) and takes no new requests."""


class RequestCutError(RuntimeError):
    """The server cut the request short (a shutdown whose drain timed out)."""


@dataclass
class EngineSnapshot:
    """What the engine looked like after its last loop iteration; read without locks."""

    num_running: int = 0
    num_waiting: int = 0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    pool: dict = field(default_factory=dict)
    adapters: dict = field(default_factory=dict)
    engine_stats: dict = field(default_factory=dict)
    in_flight: int = 0
    time: float = 0.0


@dataclass
class _Tracked:
    """The engine thread's record of one in-flight request (metrics and adapter refcount)."""

    adapter: str | None
    arrival: float
    prompt_len: int = 0
    scheduled: bool = False
    prefilled: bool = False
    num_generated: int = 0
    last_token_time: float | None = None


class _Command:
    """A function to run on the engine thread; its result goes back to an asyncio future."""

    __slots__ = ("fn", "future", "loop")

    def __init__(self, fn: Callable[[], object], loop=None, future=None):
        self.fn, self.loop, self.future = fn, loop, future

    def run(self) -> None:
        try:
            result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            self._resolve(None, exc)
        else:
            self._resolve(result, None)

    def _resolve(self, result, exc) -> None:
        if self.future is None:
            if exc is not None:
                logger.warning("engine command failed: %s", exc)
            return
        self.loop.call_soon_threadsafe(_set_future, self.future, result, exc)


def _set_future(future: asyncio.Future, result, exc) -> None:
    if future.done():  # the caller went away
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class RequestStream:
    """The outputs of one request, cumulative as in vLLM, ending with a finished one.
    `close()` before the end aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str):
        self.engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self._end()  # the engine thread already dropped the request
            raise item
        if item.finished:
            self._end()
        return item

    def close(self) -> None:
        if not self.finished:
            self._end()
            self.engine.abort(self.request_id)

    def _end(self) -> None:
        self.finished = True
        self.engine._streams.pop(self.request_id, None)


class AsyncEngine:
    """Serves an LLMEngine to asyncio code. Create it, then `start()` it inside a running loop.

    `metrics` (optional) receives per-request events from the engine thread: an object with
    `on_scheduled(queue_s)`, `on_first_token(ttft_s, prompt_tokens)`, `on_tokens(count, itl_s)`,
    `on_finished(output, e2e_s, tpot_s)` and `on_adapter_loads(count, seconds)`.
    """

    def __init__(self, engine, metrics=None):
        self.engine = engine
        self.metrics = metrics
        self.snapshot = EngineSnapshot()
        self.dead_reason: str | None = None
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}  # loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._queued_adds = 0  # add commands not yet run by the engine thread
        self._queued_lock = threading.Lock()
        # Engine-thread state.
        self._tracked: dict[str, _Tracked] = {}
        self._adapter_refs: dict[str, int] = {}
        self._pending_unloads: dict[str, list[_Command]] = {}
        self._load_counters = (0, 0.0)  # (device_loads, load_seconds) last seen
        self._cut_reason: str | None = None  # set by cut_all: later adds are refused too

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._refresh_snapshot()
        self._thread = threading.Thread(target=self._run, name="moelora-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine thread; requests still in flight end with an error."""
        if self._thread is None:
            return
        self._commands.put(None)
        self._thread.join(timeout)
        self._thread = None
        self.engine.stop()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_reason is None

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a slot plus requests not yet handed to the engine."""
        return self.snapshot.num_waiting + self._queued_adds

    # -- the asyncio API ---------------------------------------------------------------------
    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def call(self, fn: Callable[[], object]):
        """Runs `fn()` on the engine thread between steps and returns its result."""
        self._check_alive()
        future = self._loop.create_future()
        self._commands.put(_Command(fn, self._loop, future))
        return await future

    async def add_request(self, request_id: str, prompt, params: SamplingParams,
                          lora_request: LoRARequest | None = None,
                          prompt_len: int = 0) -> RequestStream:
        """Hands a request to the engine and returns the stream of its outputs. Bad input
        (ValueError, TypeError, adapter errors) raises here, before anything streams."""
        self._check_alive()
        if lora_request is not None and not self.engine.adapters.registered(lora_request):
            # A first request registers its adapter: its files parsed and checked, tens of
            # milliseconds for a large MoE adapter. On a worker thread, so that the engine
            # thread keeps stepping meanwhile; the add below then finds it registered.
            await asyncio.to_thread(self.engine.adapters.resolve, lora_request)
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream.queue
        with self._queued_lock:
            self._queued_adds += 1
        try:
            await self.call(lambda: self._add(request_id, prompt, params, lora_request,
                                              prompt_len))
        except BaseException as exc:
            self._streams.pop(request_id, None)
            if isinstance(exc, asyncio.CancelledError):
                self.abort(request_id)  # the add may still run: undo it (commands are FIFO)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Aborts a request from any thread (fire and forget)."""
        self._commands.put(_Command(lambda: self._abort(request_id)))

    async def load_adapter(self, lora_request: LoRARequest) -> None:
        """Registers an adapter, validates its content and loads it, in a worker thread
        (AdapterManager.preload: an adapter that fails is left unregistered, so a later load
        of its name starts clean; one that finds every device slot busy stays in host memory,
        checked, and moves to the device with its first request)."""
        name = lora_request.lora_name
        await self.call(lambda: self._check_loadable(name))
        await asyncio.to_thread(self.engine.adapters.preload, lora_request)

    async def cut_all(self, reason: str) -> int:
        """Ends every request in flight with RequestCutError(reason), and refuses new ones
        from then on (the server is going away); returns how many were cut."""
        return await self.call(lambda: self._cut_all(reason))

    async def unload_adapter(self, name: str) -> bool:
        """Unloads an adapter. With requests of it in flight the native unload waits for them
        to finish; this returns once it happened. Returns whether it had to wait."""
        future = self._loop.create_future()
        self._commands.put(_Command(lambda: self._unload(name, future), self._loop, None))
        return await future

    # -- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        failures = 0
        while True:
            idle = not engine.has_unfinished_requests()
            commands = self._drain(block=idle)
            if commands is None:
                self._fail_all(EngineDeadError("the engine was shut down"))
                return
            for command in commands:
                command.run()
            if engine.has_unfinished_requests():
                step_start = now()
                try:
                    outputs = engine.step()
                except Exception as exc:  # one bad step must not kill the server
                    failures += 1
                    logger.exception("engine step failed")
                    self._fail_all(RuntimeError(f"engine step failed: {exc}"))
                    if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                        self.dead_reason = f"{failures} consecutive engine steps failed: {exc}"
                        self._refresh_snapshot()
                        return
                    continue
                failures = 0
                self._mark_scheduled(step_start)
                self._dispatch(outputs)
            self._refresh_snapshot()

    def _drain(self, block: bool) -> list[_Command] | None:
        commands = []
        try:
            first = self._commands.get(timeout=IDLE_POLL_S) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return commands
        if first is None:
            return None
        commands.append(first)
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return commands
            if command is None:
                return None
            commands.append(command)

    def _add(self, request_id, prompt, params, lora_request, prompt_len) -> None:
        with self._queued_lock:
            self._queued_adds -= 1
        if self._cut_reason is not None:
            raise RequestCutError(self._cut_reason)
        name = lora_request.lora_name if lora_request is not None else None
        if name is not None and name in self._pending_unloads:
            raise AdapterUnavailableError(f"adapter '{name}' is being unloaded")
        self.engine.add_request(request_id, prompt, params, lora_request)
        self._tracked[request_id] = _Tracked(adapter=name, arrival=now(), prompt_len=prompt_len)
        if name is not None:
            self._adapter_refs[name] = self._adapter_refs.get(name, 0) + 1

    def _abort(self, request_id: str) -> None:
        if request_id not in self._tracked:
            return  # finished (or never added) before the abort arrived
        self.engine.abort_request(request_id)
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is None or tracked.adapter is None:
            return
        name = tracked.adapter
        self._adapter_refs[name] -= 1
        if self._adapter_refs[name] == 0:
            del self._adapter_refs[name]
            waiters = self._pending_unloads.pop(name, None)
            if waiters is not None:
                self._unload_now(name, waiters, deferred=True)

    def _check_loadable(self, name: str) -> None:
        """Refuses a load while an unload of the name waits."""
        if name in self._pending_unloads:
            raise AdapterUnavailableError(f"adapter '{name}' is still being unloaded (requests "
                                          f"of it are in flight); retry shortly")

    def _cut_all(self, reason: str) -> int:
        self._cut_reason = reason
        count = len(self._tracked)
        self._fail_all(RequestCutError(reason))
        return count

    def _unload(self, name: str, future: asyncio.Future) -> None:
        waiter = _Command(lambda: None, self._loop, future)
        if self._adapter_refs.get(name, 0) > 0:
            self._pending_unloads.setdefault(name, []).append(waiter)
            return
        if name in self._pending_unloads:
            self._pending_unloads[name].append(waiter)
            return
        self._unload_now(name, [waiter], deferred=False)

    def _unload_now(self, name: str, waiters: list[_Command], deferred: bool) -> None:
        try:
            self.engine.adapters.unload(name)
        except Exception as exc:  # noqa: BLE001 - reported to every waiter
            for waiter in waiters:
                waiter._resolve(None, exc)
            return
        for waiter in waiters:
            waiter._resolve(deferred, None)

    def _mark_scheduled(self, step_start: float) -> None:
        running = {seq.request_id for seq in self.engine.scheduler.running}
        for request_id in running:
            tracked = self._tracked.get(request_id)
            if tracked is not None and not tracked.scheduled:
                tracked.scheduled = True
                if self.metrics is not None:
                    self.metrics.on_scheduled(max(0.0, step_start - tracked.arrival))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        t = now()
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is not None:
                self._observe(output, tracked, t)
            stream = self._streams.get(output.request_id)
            if stream is not None:
                self._loop.call_soon_threadsafe(stream.put_nowait, output)
            if output.finished:
                self._release(output.request_id)

    def _observe(self, output: RequestOutput, tracked: _Tracked, t: float) -> None:
        metrics = self.metrics
        generated = sum(len(o.token_ids) for o in output.outputs)
        new_tokens = generated - tracked.num_generated
        tracked.num_generated = generated
        if not tracked.scheduled:
            tracked.scheduled = True  # scheduled and finished within one step
            if metrics is not None:
                metrics.on_scheduled(0.0)
        if new_tokens > 0 and metrics is not None:
            if not tracked.prefilled:
                first = output.metrics.first_token_time if output.metrics else None
                ttft = (first if first is not None else t) - (
                    output.metrics.arrival_time if output.metrics else tracked.arrival)
                metrics.on_first_token(max(0.0, ttft), tracked.prompt_len or
                                       len(output.prompt_token_ids))
                metrics.on_tokens(new_tokens, None)
            else:
                metrics.on_tokens(new_tokens, t - tracked.last_token_time)
        if new_tokens > 0:
            tracked.prefilled = True
            tracked.last_token_time = t
        if output.finished and metrics is not None:
            m = output.metrics
            arrival = m.arrival_time if m is not None else tracked.arrival
            finish = (m.finished_time if m is not None and m.finished_time else t)
            longest = max((len(o.token_ids) for o in output.outputs), default=0)
            tpot = None
            if m is not None and m.first_token_time is not None and longest > 1:
                tpot = (finish - m.first_token_time) / (longest - 1)
            metrics.on_finished(output, max(0.0, finish - arrival), tpot)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._tracked):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # the engine is already in trouble
                logger.exception("abort of %s failed", request_id)
            stream = self._streams.get(request_id)
            if stream is not None:
                self._loop.call_soon_threadsafe(stream.put_nowait, exc)
            self._release(request_id)

    def _refresh_snapshot(self) -> None:
        engine = self.engine
        scheduler = engine.scheduler
        running = list(scheduler.running)
        waiting = list(scheduler.waiting)
        adapter_stats = engine.adapters.stats()
        self.snapshot = EngineSnapshot(
            num_running=len(running), num_waiting=len(waiting),
            running_adapters=self._adapter_names(running),
            waiting_adapters=self._adapter_names(waiting),
            pool=dict(engine.memory.pool.stats()), adapters=adapter_stats,
            engine_stats=dict(engine.stats), in_flight=len(self._tracked), time=time.time())
        loads = int(adapter_stats.get("device_loads", 0))
        seconds = float(adapter_stats.get("load_seconds", 0.0))
        last_loads, last_seconds = self._load_counters
        if loads > last_loads and self.metrics is not None:
            self.metrics.on_adapter_loads(loads - last_loads, seconds - last_seconds)
        self._load_counters = (loads, seconds)

    def _adapter_names(self, seqs) -> tuple[str, ...]:
        names = set()
        for seq in seqs:
            tracked = self._tracked.get(seq.request_id)
            if tracked is not None and tracked.adapter is not None:
                names.add(tracked.adapter)
        return tuple(sorted(names))

    def _check_alive(self) -> None:
        if self._loop is None:
            raise EngineDeadError("the engine was not started")
        if not self.is_running:
            raise EngineDeadError(self.dead_reason or "the engine thread is not running")
