"""Thread pools that keep work off the event loop.

Parsing bodies, tokenising and rendering templates run here, never on the loop, so /health and
the streams of other clients keep answering. Work that stays in Python bytecode shares the GIL
in slices (the server shortens the switch interval to 1 ms); single long C calls (json.loads of
a large body) still hold it, which the body size limit bounds.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor


class OffLoop:
    def __init__(self, name: str, workers: int):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def run(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
