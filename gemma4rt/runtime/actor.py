"""Actor: an asyncio task with an inbox and a {MessageType: handler} table."""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

_STOP = object()


class Actor:
    """Subclasses fill `self.handlers` ({message class: callable}); handlers may be sync or async.
    `send()` never blocks; `stop()` lets the inbox drain up to the stop marker, then ends the task."""

    def __init__(self, name: str):
        self.name = name
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.handlers: dict[type, Callable[[Any], Any]] = {}
        self._task: Optional[asyncio.Task] = None
        self.stopped = asyncio.Event()

    def send(self, msg: Any) -> None:
        self.inbox.put_nowait(msg)

    def start(self) -> asyncio.Task:
        self._task = asyncio.get_running_loop().create_task(self._main(), name=self.name)
        return self._task

    async def _main(self) -> None:
        try:
            await self.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("actor %s failed", self.name)
            raise
        finally:
            self.stopped.set()

    async def run(self) -> None:
        while True:
            msg = await self.inbox.get()
            if msg is _STOP:
                return
            await self.dispatch(msg)

    async def dispatch(self, msg: Any) -> None:
        fn = self.handlers.get(type(msg))
        if fn is None:
            log.warning("%s: no handler for %s", self.name, type(msg).__name__)
            return
        try:
            r = fn(msg)
            if inspect.isawaitable(r):
                await r
        except Exception:
            log.exception("%s: handler for %s failed", self.name, type(msg).__name__)

    def drain_nowait(self) -> list:
        """Messages already in the inbox (for actors that poll between steps)."""
        out = []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except asyncio.QueueEmpty:
                return out

    async def stop(self, timeout: float = 10.0) -> None:
        if self._task is None or self._task.done():
            return
        self.inbox.put_nowait(_STOP)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            self._task.cancel()

    @staticmethod
    def is_stop(msg: Any) -> bool:
        return msg is _STOP
