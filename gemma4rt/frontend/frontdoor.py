"""FrontDoor: the actor in the main process that talks to the engine.

It receives TokenOutputs / SchedulerStats / engine death from the engine mailbox and routes each
RequestOutput to the queue of its request; `generate()` turns one request's outputs into text chunks
(incremental detokenization + stop strings) and aborts the request in the engine when its consumer
goes away (client disconnect cancels the handler) or a stop string ends it."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from gemma4rt.protocol import (
    AbortRequest, AddRequest, FlushCache, RequestOutput, SchedulerStats, TokenOutputs,
)
from gemma4rt.runtime.actor import Actor
from gemma4rt.frontend.errors import bad_request
from gemma4rt.frontend.textproc import IncrementalDetokenizer, StopStrings

log = logging.getLogger(__name__)


@dataclass
class SeqChunk:
    """What one sequence produced since the previous chunk."""

    text: str
    token_ids: list[int]
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    prompt_logprobs: Optional[list] = None       # the whole prompt's, once (chunked prefill joined)
    prompt_top_logprobs: Optional[list] = None
    finish_reason: Optional[str] = None
    matched_stop: object = None
    error: Optional[str] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    client_error: object = None       # an APIError (4xx) raised for this sequence before it started


@dataclass
class SeqOptions:
    stop: list[str] = field(default_factory=list)
    include_stop: bool = False
    skip_special_tokens: bool = True
    drop_ids: frozenset = frozenset()      # token ids left out of the text (control tokens, see chat.py)


class FrontDoor(Actor):
    def __init__(self, engine, tokenizer, model_info, sched_cfg, metrics=None):
        super().__init__("frontdoor")
        self.engine = engine                   # has .send(msg); runtime.process.EngineProcess
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.sched_cfg = sched_cfg
        self.metrics = metrics
        self.queues: dict[str, asyncio.Queue] = {}
        self.groups: dict[str, tuple[str, ...]] = {}     # a request's id -> its sequences' ids (fan_in)
        self.stats: Optional[SchedulerStats] = None
        self.engine_dead: Optional[str] = None
        self.shutting_down = False
        self.handlers = {TokenOutputs: self.on_outputs, SchedulerStats: self.on_stats}
        self._n = 0

    # -- engine -> front door ----------------------------------------------------------------
    def on_outputs(self, m: TokenOutputs) -> None:
        qs = self.queues
        for o in m.outputs:
            q = qs.get(o.rid)
            if q is not None:
                q.put_nowait(o)

    def on_stats(self, m: SchedulerStats) -> None:
        self.stats = m
        if self.metrics is not None:
            self.metrics.on_stats(m)

    def on_engine_dead(self, reason: str) -> None:
        self.engine_dead = reason
        for rid, q in list(self.queues.items()):
            q.put_nowait(RequestOutput(rid=rid, new_token_ids=[], finish_reason="error",
                                       error=f"The engine stopped: {reason}"))

    # -- front door -> engine ----------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.engine_dead is None and not self.shutting_down

    def num_open(self) -> int:
        return len(self.queues)

    def queue_full(self, extra: int = 1) -> bool:
        cap = self.sched_cfg.max_running_requests + self.sched_cfg.max_queued_requests
        return len(self.queues) + extra > cap

    def new_rid(self, prefix: str = "req") -> str:
        self._n += 1
        return f"{prefix}-{self._n:x}-{int(time.time() * 1000) & 0xffffff:x}"

    def check_rid_free(self, rid: str) -> None:
        """A client's reused "rid": the open request keeps it (a 400 for the new one)."""
        if rid in self.queues:
            raise bad_request(f"The request id {rid!r} belongs to a request still running.", param="rid")

    def submit(self, add: AddRequest) -> asyncio.Queue:
        self.check_rid_free(add.rid)    # again here: two requests may race past the routes' check
        q: asyncio.Queue = asyncio.Queue()
        self.queues[add.rid] = q
        add.arrival_time = time.time()
        try:
            self.engine.send(add)
        except Exception as e:
            q.put_nowait(RequestOutput(rid=add.rid, new_token_ids=[], finish_reason="error",
                                       error=f"The engine is not running: {e}"))
        return q

    def abort(self, rid: str) -> None:
        if self.queues.pop(rid, None) is not None and self.engine_dead is None:
            try:
                self.engine.send(AbortRequest(rid=rid))
            except Exception:
                pass
            if self.metrics is not None:
                self.metrics.on_finish("abort")

    def abort_all(self) -> int:
        return sum(self.abort_external(rid) for rid in list(self.queues))

    def abort_external(self, rid: str) -> bool:
        """/abort_request: end the request for its waiting client with finish_reason abort, and stop
        it in the engine (the client's generator sees a final output and sends nothing more)."""
        q = self.queues.get(rid)
        if q is None:
            return False
        q.put_nowait(RequestOutput(rid=rid, new_token_ids=[], finish_reason="abort"))
        if self.engine_dead is None:
            try:
                self.engine.send(AbortRequest(rid=rid))
            except Exception:
                pass
        return True

    def flush_cache(self) -> None:
        self.engine.send(FlushCache())

    # -- one sequence --------------------------------------------------------------------------
    async def generate(self, add: AddRequest, opts: SeqOptions) -> AsyncIterator[SeqChunk]:
        """Yield SeqChunks until the sequence finishes. Closing the generator early (client gone)
        aborts the request."""
        rid = add.rid
        q = self.submit(add)
        detok = IncrementalDetokenizer(self.tokenizer.tok, opts.skip_special_tokens)
        stop = StopStrings(opts.stop, opts.include_stop)
        m = self.metrics
        t0 = time.monotonic()
        t_last = None
        n_out = 0
        done = False
        p_lp: list = []                  # prompt logprobs arrive per prefill chunk: join them
        p_top: list = []
        p_sent = False
        try:
            while True:
                o: RequestOutput = await q.get()
                if o.rid != rid:
                    continue
                if q.qsize():            # coalesce what is already there
                    outs = [o]
                    while q.qsize() and outs[-1].finish_reason is None:
                        outs.append(q.get_nowait())
                    o = _merge(outs)
                new = o.new_token_ids
                if opts.drop_ids and new:
                    text = detok.add([t for t in new if t not in opts.drop_ids])
                else:
                    text = detok.add(new) if new else ""
                fin = o.finish_reason
                if fin is not None:
                    text += detok.flush()
                text = stop.feed(text, final=fin is not None)
                matched = o.matched_stop
                if stop.matched is not None:
                    fin, matched = "stop", stop.matched
                now = time.monotonic() if m is not None else 0.0      # only the metrics read the clock
                if new and m is not None:
                    if t_last is None:
                        m.ttft.observe(now - t0)
                    else:
                        m.itl.observe((now - t_last) / len(new))
                    t_last = now
                n_out += len(new)
                plp = ptop = None
                if o.prompt_logprobs is not None and not p_sent:
                    p_lp += o.prompt_logprobs
                    p_top += o.prompt_top_logprobs or [None] * len(o.prompt_logprobs)
                    if len(p_lp) >= o.num_prompt_tokens or fin is not None:
                        plp, ptop, p_sent = p_lp, p_top, True
                if fin is not None:
                    done = True
                    self.queues.pop(rid, None)
                    if stop.matched is not None and o.finish_reason is None and self.engine_dead is None:
                        self.engine.send(AbortRequest(rid=rid))
                    if m is not None:
                        m.on_finish(fin, o.num_prompt_tokens, n_out, now - t0)
                yield SeqChunk(text=text, token_ids=new, logprobs=o.logprobs, top_logprobs=o.top_logprobs,
                               prompt_logprobs=plp, prompt_top_logprobs=ptop,
                               finish_reason=fin, matched_stop=matched, error=o.error,
                               num_prompt_tokens=o.num_prompt_tokens, num_cached_tokens=o.num_cached_tokens,
                               num_output_tokens=n_out)
                if done:
                    return
        finally:
            if not done:
                self.abort(rid)


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    o = RequestOutput(rid=outs[0].rid, new_token_ids=[t for x in outs for t in x.new_token_ids])
    if any(x.logprobs is not None for x in outs):
        o.logprobs = [v for x in outs for v in (x.logprobs or [])]
    if any(x.top_logprobs is not None for x in outs):
        o.top_logprobs = [v for x in outs for v in (x.top_logprobs or [])]
    if any(x.prompt_logprobs is not None for x in outs):
        o.prompt_logprobs = [v for x in outs for v in (x.prompt_logprobs or [])]
        o.prompt_top_logprobs = [v for x in outs if x.prompt_logprobs is not None
                                 for v in (x.prompt_top_logprobs or [None] * len(x.prompt_logprobs))]
    last = outs[-1]
    o.finish_reason, o.matched_stop, o.error = last.finish_reason, last.matched_stop, last.error
    o.num_prompt_tokens = max(x.num_prompt_tokens for x in outs)
    o.num_cached_tokens = max(x.num_cached_tokens for x in outs)
    return o
