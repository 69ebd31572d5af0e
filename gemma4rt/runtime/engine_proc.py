"""The engine process: the scheduler actor and the rank-0 worker in one loop (no IPC inside a step).

Started by the main process (runtime/process.py) as `python -m gemma4rt.runtime.engine_proc`. It
connects back over a Unix socket, builds the Engine, answers EngineReady (or WorkerFailed), then
loops: apply the inbox (adds, aborts, flushes) between steps, run steps while there is work, send
one TokenOutputs per step and SchedulerStats now and then. It exits when the socket closes (the
parent is gone: EOF watchdog), on Shutdown, or when its parent dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import time

import msgspec

from gemma4rt.config import EngineConfig
from gemma4rt.protocol import (
    AbortRequest, AddRequest, EngineReady, FlushCache, RequestOutput, Shutdown, TokenOutputs,
    WorkerFailed,
)
from gemma4rt.runtime.actor import Actor
from gemma4rt.runtime.mailbox import SocketChannel, pump

log = logging.getLogger("gemma4rt.engine")
CONFIG_ENV = "GEMMA4RT_ENGINE_CONFIG"
STATS_INTERVAL = 0.05
FRAME_WAIT_S = 0.05     # after a step, at most this long finishing a frame that is arriving
READ_LIMIT = 1 << 24    # the socket reader's buffer: big media frames arrive in few loop turns


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Linux: have the kernel signal us when the parent dies (prctl PR_SET_PDEATHSIG = 1)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)
    except Exception:        # the socket EOF watchdog still ends us
        pass


class EngineActor(Actor):
    """The scheduler actor of the engine process, driving the in-process Engine."""

    def __init__(self, engine, channel: SocketChannel, recv_interval: int = 1):
        super().__init__("engine")
        self.engine = engine
        self.channel = channel
        self.recv_interval = max(1, recv_interval)
        self._last_stats = 0.0
        self._stats_dirty = True
        self.handlers = {AddRequest: self.on_add, AbortRequest: self.on_abort, FlushCache: self.on_flush}

    def on_add(self, m: AddRequest) -> None:
        err = self.engine.add_request(m)
        if err is not None:
            self.channel.send(TokenOutputs(outputs=[RequestOutput(
                rid=m.rid, new_token_ids=[], finish_reason="error", error=err,
                num_prompt_tokens=len(m.prompt_token_ids))]))
        self._stats_dirty = True

    def on_abort(self, m: AbortRequest) -> None:
        self.engine.abort(m.rid)
        self._stats_dirty = True

    def on_flush(self, m: FlushCache) -> None:
        self.engine.flush_cache()
        self._stats_dirty = True

    def _send_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_stats >= STATS_INTERVAL:
            self.channel.send(self.engine.stats())
            self._last_stats = now
            self._stats_dirty = False

    async def run(self) -> None:
        eng = self.engine
        while True:
            msgs = self.drain_nowait()
            if not msgs and not eng.has_work():
                if self._stats_dirty:
                    self._send_stats(force=True)
                await self.channel.drain()
                msgs = [await self.inbox.get()] + self.drain_nowait()
            for m in msgs:
                if m is None or isinstance(m, Shutdown) or self.is_stop(m):
                    log.info("engine stopping (%s)", "shutdown" if m is not None else "parent closed the socket")
                    return
                await self.dispatch(m)
            for _ in range(self.recv_interval):
                if not eng.has_work():
                    break
                out = eng.step()
                self._stats_dirty = True
                if out.outputs:
                    self.channel.send(out)
                self._send_stats()
            await self.channel.drain()
            await asyncio.sleep(0)          # let the socket pump fill the inbox
            # The transport reads one chunk per loop turn: a request carrying images (megabytes of
            # pixels) would take a hundred steps to arrive if only one turn ran per step.
            deadline = time.monotonic() + FRAME_WAIT_S
            while self.channel.partial and time.monotonic() < deadline:
                await asyncio.sleep(0)


async def _amain(sock_path: str, cfg: EngineConfig) -> int:
    reader, writer = await asyncio.open_unix_connection(sock_path, limit=READ_LIMIT)
    ch = SocketChannel(reader, writer)
    try:
        from gemma4rt.engine import Engine
        engine = Engine(cfg)
        tok_path = engine.tokenizer_path
    except BaseException as e:
        log.exception("engine start failed")
        ch.send(WorkerFailed(rank=0, reason=f"{type(e).__name__}: {e}"))
        await ch.drain()
        ch.close()
        return 1
    ch.send(EngineReady(model_info=dataclasses.asdict(engine.model_info),
                        pool_pages={p.name: p.num_pages for p in engine.pool_specs},
                        pool_page_size={p.name: p.page_size for p in engine.pool_specs},
                        tokenizer_path=tok_path, pid=os.getpid()))
    await ch.drain()
    actor = EngineActor(engine, ch, cfg.scheduler.scheduler_recv_interval)
    actor.start()
    pump_task = asyncio.get_running_loop().create_task(pump(ch, actor))
    await actor.stopped.wait()
    pump_task.cancel()
    from gemma4rt.worker.tp_worker import stop_tp_runner
    stop_tp_runner(engine.runner, timeout=10.0)     # the ranks would die with us anyway (parent-death signal)
    ch.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--log-level", default="info")
    a = ap.parse_args(argv)
    set_parent_death_signal()
    if os.getppid() != a.parent_pid:           # the parent died before prctl took effect
        return 1
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s engine %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the main process drains and then tells us
    cfg = msgspec.json.decode(os.environ[CONFIG_ENV].encode(), type=EngineConfig)
    return asyncio.run(_amain(a.socket, cfg))


if __name__ == "__main__":
    sys.exit(main())
