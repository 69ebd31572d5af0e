"""Launch and supervise the engine process from the main process.

`EngineProcess.start()` spawns `python -m gemma4rt.runtime.engine_proc`, accepts its Unix-socket
connection and waits for EngineReady (the ready handshake). Afterwards every message from the
engine goes to `on_message`; when the socket closes or the process exits, `on_dead(reason)` runs
once. The child dies with us: it watches the socket for EOF and has PR_SET_PDEATHSIG set.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable, Optional

import msgspec

from gemma4rt.config import EngineConfig
from gemma4rt.protocol import EngineReady, Shutdown, WorkerFailed
from gemma4rt.runtime.engine_proc import CONFIG_ENV
from gemma4rt.runtime.mailbox import SocketChannel

log = logging.getLogger(__name__)


class EngineDied(RuntimeError):
    pass


class EngineProcess:
    def __init__(self, cfg: EngineConfig, log_level: str = "info"):
        self.cfg = cfg
        self.log_level = log_level
        self.proc: Optional[subprocess.Popen] = None
        self.channel: Optional[SocketChannel] = None
        self.ready: Optional[EngineReady] = None
        self.dead = False
        self._dir = tempfile.mkdtemp(prefix="gemma4rt-")
        self._reader_task: Optional[asyncio.Task] = None
        self.on_message: Callable[[Any], None] = lambda m: None
        self.on_dead: Callable[[str], None] = lambda reason: None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    async def start(self, timeout: float = 900.0) -> EngineReady:
        path = os.path.join(self._dir, "engine.sock")
        conn: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_conn(r, w):
            if not conn.done():
                conn.set_result(SocketChannel(r, w))
        server = await asyncio.start_unix_server(on_conn, path)
        env = dict(os.environ)
        env[CONFIG_ENV] = msgspec.json.encode(self.cfg).decode()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gemma4rt.runtime.engine_proc", "--socket", path,
             "--parent-pid", str(os.getpid()), "--log-level", self.log_level], env=env)
        try:
            waiter = asyncio.get_running_loop().run_in_executor(None, self.proc.wait)
            done, _ = await asyncio.wait({conn, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if conn not in done:
                raise EngineDied(f"engine process exited with code {self.proc.returncode} before connecting"
                                 if waiter in done else "engine process did not connect in time")
            self.channel = conn.result()
            first = await asyncio.wait_for(self.channel.recv(), timeout)
        finally:
            server.close()
        if isinstance(first, WorkerFailed):
            await self._reap(5.0)
            raise EngineDied(f"engine failed to start: {first.reason}")
        if not isinstance(first, EngineReady):
            await self._reap(5.0)
            raise EngineDied(f"engine sent {type(first).__name__} instead of EngineReady")
        self.ready = first
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        asyncio.get_running_loop().run_in_executor(None, self._watch_exit, asyncio.get_running_loop())
        return first

    def _watch_exit(self, loop) -> None:
        code = self.proc.wait()
        loop.call_soon_threadsafe(self._died, f"engine process exited with code {code}")

    async def _read_loop(self) -> None:
        while True:
            msg = await self.channel.recv()
            if msg is None:
                self._died("engine connection closed")
                return
            try:
                self.on_message(msg)
            except Exception:
                log.exception("engine message handler failed")

    def _died(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        log.error("engine is gone: %s", reason)
        self.on_dead(reason)

    def send(self, msg: Any) -> None:
        if self.dead or self.channel is None:
            raise EngineDied("engine is not running")
        self.channel.send(msg)

    async def _reap(self, timeout: float) -> Optional[int]:
        if self.proc is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, self.proc.wait), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            return await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the engine to finish, then wait; kill it if it does not go."""
        self.dead = True
        if self.channel is not None and not self.channel.closed:
            try:
                self.channel.send(Shutdown(reason="server stopping"))
                await self.channel.drain()
            except Exception:
                pass
        if self.proc is not None and self.proc.poll() is None:
            await self._reap(timeout)
        if self.channel is not None:
            self.channel.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
        shutil.rmtree(self._dir, ignore_errors=True)
