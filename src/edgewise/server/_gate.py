"""How many requests may hold a database session at once, and what the others do.

Invariant: at most `slots` requests hold a session; the engine's pool is sized from the same
number and the thread pool's (`app.py`: slots + background sessions, overflow for the audit
records written beside them), so a request that holds a slot gets its connection without
waiting. The
others wait on the event loop, holding neither a thread nor a connection, for at most
`queue_timeout_s`, then get 503 with `Retry-After`. Without the gate, requests beyond the pool
size waited for a connection inside threads while the requests holding connections waited for
a thread (or for the event loop), and the server stalled (issue 24).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._errors import ServiceBusy

__all__ = ["DbGate"]


class DbGate:
    def __init__(self, *, slots: int, queue_timeout_s: float, retry_after_s: int) -> None:
        if slots < 1:
            raise ValueError("the server needs at least one database slot")
        self.slots = slots
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self._free = asyncio.Semaphore(slots)
        self.waiting = 0  # requests in line now (for metrics and tests)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await self._free.acquire()
        except TimeoutError:
            raise ServiceBusy(f"the server is busy ({self.slots} requests are using the "
                              f"database and {self.waiting - 1} more are waiting); retry in "
                              f"{self.retry_after_s} s", retry_after_s=self.retry_after_s
                              ) from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._free.release()
