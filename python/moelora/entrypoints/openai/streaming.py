"""Server-sent events and client-disconnect handling.

A client that goes away must stop its requests at once (their KV pages go back to the pool).
Starlette's StreamingResponse only notices a disconnect when a write fails, and a non-streaming
handler never notices; both here listen for the ASGI `http.disconnect` message instead and
cancel the work, whose cleanup aborts the engine requests.
"""

from __future__ import annotations

import asyncio
import json

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up; never seen by it


def sse(payload: dict) -> str:
    """One event. Strict JSON (allow_nan=False, as JSONResponse writes): a non-finite number
    raises here, inside the stream's generator, which then sends an error event instead."""
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that stops (and closes its iterator) when the client
    disconnects, even while waiting for the next event."""

    def __init__(self, content, on_close=None):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close  # releases what the iterator holds, even if it never started

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._stream_until_disconnect(receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                self.on_close()

    async def _stream_until_disconnect(self, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client went away mid-write
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work) -> Response:
    """Awaits `work` (a coroutine returning a Response) unless the client disconnects first,
    in which case the work is cancelled (its cleanup aborts the engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
