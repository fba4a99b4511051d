"""Graceful shutdown: SIGTERM (or a first Ctrl+C) drains the server, then it exits with 0.

1. Admission stops: every new request but /metrics gets 503 with Retry-After (/health too, so
   a load balancer moves away). The socket stays open, so clients hear why instead of being
   refused.
2. Requests in flight run to their end for up to --shutdown-timeout seconds.
3. Any still running then are cut: streams end with an error event and `data: [DONE]`,
   non-streaming requests get a JSON 503.
4. uvicorn stops, the engine shuts down, the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn
from fastapi.responses import JSONResponse

from moelora.entrypoints.openai.cli_args import DEFAULT_SHUTDOWN_TIMEOUT_S
from moelora.entrypoints.openai.errors import RETRY_AFTER_S, error_body

logger = logging.getLogger("moelora.server")

CUT_FLUSH_S = 5.0  # how long cut requests get to send their last event
OPEN_WHILE_DRAINING = ("/metrics",)


class ShutdownGate:
    """ASGI middleware: counts HTTP requests in flight and, once draining, refuses new ones."""

    def __init__(self, app):
        self.app = app
        self.draining = False
        self.active = 0
        self._idle: asyncio.Event | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.draining and scope.get("path") not in OPEN_WHILE_DRAINING:
            response = JSONResponse(
                error_body(503, "the server is shutting down; retry on another replica"), 503,
                headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
            return await response(scope, receive, send)
        self.active += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.active -= 1
            if self.active == 0 and self._idle is not None:
                self._idle.set()

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every request in flight finished within `timeout` seconds."""
        if self.active == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return self.active == 0
        finally:
            self._idle = None
        return True


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain above in place of its immediate shutdown. The signal
    is not re-raised after the drain (uvicorn would, making the exit status -15)."""

    def __init__(self, config: uvicorn.Config, gate: ShutdownGate, engine,
                 timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S):
        super().__init__(config)
        self.gate = gate
        self.engine = engine  # AsyncEngine: cut_all() ends what is still running
        self.timeout_s = timeout_s
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler: only flags here; the drain starts on the loop's next tick.
        if self._drain_requested:
            logger.warning("second %s: exiting without waiting", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        self.gate.start_draining()
        logger.info("draining: %d requests in flight, waiting up to %.1f s",
                    self.gate.active, self.timeout_s)
        if not await self.gate.wait_idle(self.timeout_s):
            try:
                cut = await self.engine.cut_all(
                    f"the server is shutting down: the request was still running after "
                    f"--shutdown-timeout {self.timeout_s:g} s")
            except Exception as exc:  # noqa: BLE001 - a dead engine has nothing left to cut
                logger.warning("cutting requests failed: %s", exc)
                cut = 0
            logger.info("drain timed out: cut %d engine requests", cut)
            await self.gate.wait_idle(CUT_FLUSH_S)
        self.should_exit = True
