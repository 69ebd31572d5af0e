"""The scheduler core: continuous batching with chunked prefill, paged KV per pool, prefix cache,
preemption by recompute. Synchronous and CPU only; the engine (or the scheduler actor) calls it
between steps: add_request/abort_request, then schedule() -> StepPlan, then process_result()."""
from __future__ import annotations

import time
from collections import deque
from typing import Optional

from gemma4rt.config import CacheConfig, ModelInfo, PoolSpec, SchedulerConfig
from gemma4rt.protocol import (
    AddRequest, NewRequestData, RequestOutput, ScheduledRequest, SchedulerStats, StepPlan,
    StepResult, TokenOutputs,
)
from gemma4rt.scheduler.pages import PagePool
from gemma4rt.scheduler.paging import INF, PageOps, _cdiv
from gemma4rt.scheduler.request import Request, Status

class Scheduler(PageOps):
    def __init__(self, sched_cfg: SchedulerConfig, cache_cfg: CacheConfig, pools: list[PoolSpec],
                 model_info: ModelInfo):
        if not pools:
            raise ValueError("at least one KV page pool is needed")
        self.cfg = sched_cfg
        self.model_info = model_info
        self.pools: dict[str, PagePool] = {p.name: PagePool(p) for p in pools}
        self.full_pools = [p for p in self.pools.values() if p.window is None]
        self.sliding_pools = [p for p in self.pools.values() if p.window is not None]
        sizes = {p.page_size for p in self.pools.values()}
        self.page_size = min(sizes)
        # prefix keys are per page; pools with different page sizes cannot share them
        self.prefix_enabled = not cache_cfg.disable_radix_cache and len(sizes) == 1
        self.budget = sched_cfg.chunked_prefill_size if sched_cfg.chunked_prefill_size > 0 else INF
        self.max_running = max(1, sched_cfg.max_running_requests)
        self.context_length = model_info.context_length
        self.eos_ids = frozenset(model_info.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.removed: list[str] = []
        self.pending: list[RequestOutput] = []
        # (request, its share) of each plan whose result has not come back: one plan, or two with overlap
        self.inflight: deque[list[tuple[Request, ScheduledRequest]]] = deque()
        self.overlap = False      # the Engine turns it on when it runs overlapped (its runner can launch)
        self.step_id = 0
        self._order = 0
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        self.num_preemptions = 0
        # --scheduler-delay-factor (vLLM's semantics): see _admission_open
        self.delay_factor = max(0.0, float(sched_cfg.delay_factor))
        self._clock = time.time                 # the front door stamps arrival_time with time.time()
        self._prev_time = 0.0
        self._prev_prompt = False
        self._last_prompt_latency = 0.0

    # ------------------------------------------------------------------------------------------
    # admission and abort
    # ------------------------------------------------------------------------------------------
    def add_request(self, req: AddRequest) -> Optional[str]:
        """Queue a request; returns an error message instead if it can never run."""
        if req.rid in self.requests:
            return f"Duplicate request id {req.rid!r}."
        n = len(req.prompt_token_ids)
        if n == 0:
            return "The prompt is empty."
        if n >= self.context_length:
            return (f"The input ({n} tokens) is longer than the model's context length "
                    f"({self.context_length} tokens).")
        if not self._can_ever_fit(n + 1):
            return (f"The input ({n} tokens) does not fit in the KV cache "
                    f"({self.capacity_tokens()} tokens).")
        sp = req.sampling
        # a grammar ends its request with an EOS id once complete: ignore_eos cannot outlast it
        keep_eos = not sp.ignore_eos or sp.grammar is not None
        stops = frozenset(sp.stop_token_ids) | (self.eos_ids if keep_eos else frozenset())
        self._order += 1
        r = Request(req, stops, self._order)
        if not r.arrival_time:
            r.arrival_time = self._clock()
        self.requests[r.rid] = r
        self.waiting.append(r)
        return None

    def capacity_tokens(self) -> int:
        return min(p.num_pages * p.page_size for p in (self.full_pools or self.sliding_pools))

    def _can_ever_fit(self, num_tokens: int) -> bool:
        for p in self.full_pools:
            if _cdiv(num_tokens, p.page_size) > p.num_pages:
                return False
        for p in self.sliding_pools:
            chunk = min(num_tokens, self.budget)
            need = min(_cdiv(num_tokens, p.page_size), _cdiv(p.window - 1 + chunk, p.page_size) + 1)
            if need > p.num_pages:
                return False
        return True

    def abort_request(self, rid: str) -> bool:
        r = self.requests.get(rid)
        if r is None:
            return False
        self._finish(r, "abort")
        self.pending.append(self._output(r, []))
        return True

    def flush_cache(self) -> bool:
        for p in self.pools.values():
            p.flush()
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.pending)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            pool_usage={n: p.usage() for n, p in self.pools.items()},
            pool_pages={n: p.num_pages for n, p in self.pools.items()},
            prefix_hit_tokens=self.prefix_hit_tokens, prefix_query_tokens=self.prefix_query_tokens,
            num_preemptions=self.num_preemptions)

    def pop_outputs(self) -> TokenOutputs:
        """Outputs produced outside a step (aborts, requests that can never fit)."""
        out, self.pending = self.pending, []
        return TokenOutputs(outputs=out)

    # ------------------------------------------------------------------------------------------
    # planning
    # ------------------------------------------------------------------------------------------
    def _chunk_end(self, r: Request, start: int, end: int) -> int:
        """Never end a chunk strictly inside a bidirectional (image) block: end before it, or
        extend over it when the chunk starts at the block."""
        for (a, b) in r.bidi_spans:
            if a < end < b:
                end = a if a > start else b
        return end

    def _plan_chunk(self, r: Request, budget: int) -> Optional[int]:
        """Allocate pages for r's next prefill chunk within `budget` tokens; returns its end, or
        None when the pages are not there."""
        start = r.num_computed
        L = len(r.token_ids)
        end = self._chunk_end(r, start, min(L, start + max(budget, 1)))
        if end > start and self._alloc_to(r, end):
            return end
        fit = self._max_end(r)
        if fit <= start:
            return None
        end = self._chunk_end(r, start, min(end, fit))
        if end <= start or end > fit or not self._alloc_to(r, end):
            return None
        return end

    def _victim(self, scheduled: set) -> Optional[Request]:
        for v in reversed(self.running):
            if v.rid not in scheduled:
                return v
        return None

    def _preempt(self, r: Request) -> None:
        self._drop_pending(r)
        self._release_pages(r)
        if r.known_to_worker:
            self.removed.append(r.rid)
        self.running.remove(r)
        r.reset_for_recompute()
        self.waiting.appendleft(r)
        self.num_preemptions += 1

    def _drop_pending(self, r: Request) -> None:
        """Overlap: forget the tokens of r still in flight (r is recomputed from its known tokens; the
        results of those steps are ignored: r is no longer running when they arrive)."""
        if r.pending:
            del r.token_ids[r.pending[0][0]:]
            r.pending = []
            r.hold = False

    def _new_request_data(self, r: Request) -> NewRequestData:
        return NewRequestData(
            rid=r.rid, token_ids=list(r.token_ids), num_prompt_tokens=r.num_prompt_tokens,
            sampling=r.sampling, pages={n: list(t) for n, t in r.pages.items()},
            mm_items=r.mm_items, num_output_tokens=r.num_output_tokens)

    def _admission_open(self) -> bool:
        """Whether this step may admit waiting requests. With a delay factor d > 0 and requests running,
        only once the oldest waiting request has waited longer than d x the latency of the last step that
        admitted prompts, so that prompts arriving one by one are prefilled several per step (each
        prompt step re-reads the weights, which at a mixed MoE step means nearly every expert)."""
        if self.delay_factor <= 0:
            return True
        now = self._clock()
        if self._prev_prompt:
            self._last_prompt_latency = now - self._prev_time
        self._prev_time, self._prev_prompt = now, False
        if not self.waiting or not self.running:
            return True
        oldest = min(r.arrival_time for r in self.waiting)
        return now - oldest > self.delay_factor * self._last_prompt_latency

    def schedule(self) -> Optional[StepPlan]:
        admit = self._admission_open()
        budget = self.budget
        chosen: list[tuple[Request, int, int, bool]] = []       # (request, start, num, sample)
        scheduled: set = set()
        running = self.running
        # 1) decodes first
        i = 0
        sliding = bool(self.sliding_pools)
        held = 0
        add_chosen = chosen.append
        add_scheduled = scheduled.add
        while i < len(running):
            r = running[i]
            i += 1
            if r.hold:                                # waits for its token of the step in flight
                held += 1
                continue
            start = r.num_computed
            if start < len(r.token_ids) - 1:          # still in prefill
                continue
            if sliding and start >= r.slide_check:
                self._release_window(r)
            drafts = r.draft_token_ids
            end = start + 1 + len(drafts) if drafts else start + 1
            if end > r.cap and not self._alloc_to(r, end):
                i -= 1                                # r stays at i, or leaves the list below
                v = self._victim(scheduled)
                if v is r and len(running) == 1 and r.pending:
                    r.hold = True                     # overlap: its token in flight first, then the end below
                    held += 1
                    i += 1
                    continue
                if v is r and len(running) == 1:
                    # alone and still out of pages: the cache bounds its length, like the context
                    r.finish_reason = "length"
                    self._finish(r, "length")
                    self.pending.append(self._output(r, []))
                    continue
                self._preempt(v)
                continue
            add_chosen((r, start, 1, True))            # drafts ride along in draft_token_ids
            add_scheduled(r.rid)
            budget -= end - start
        if (not self.waiting or not admit) and len(chosen) + held == len(running):      # pure decode step
            return self._finish_plan(chosen, [])
        # 2) running requests in the middle of a chunked prefill
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            if r.rid in scheduled or r.hold:
                i += 1
                continue
            if self.sliding_pools:
                self._release_window(r)
            end = self._plan_chunk(r, budget)
            if end is None:
                v = self._victim(scheduled)
                if v is None:
                    break
                if v is r and not scheduled and len(running) == 1:
                    self._fail(r, "The request does not fit in the KV cache.")
                    continue
                self._preempt(v)
                continue
            n = end - r.num_computed
            chosen.append((r, r.num_computed, n, end == len(r.token_ids)))
            scheduled.add(r.rid)
            budget -= n
            i += 1
        # 3) admit waiting requests, first come first served
        new_reqs: list[NewRequestData] = []
        while admit and self.waiting and budget > 0 and len(running) < self.max_running:
            r = self.waiting[0]
            # prompt logprobs need every prompt position computed: no prefix-cache hit for them
            if self.prefix_enabled and r.num_computed == 0 and not r.pages and not r.sampling.prompt_logprobs:
                self._match_prefix(r)
            end = self._plan_chunk(r, budget)
            if end is None:
                if not running:
                    self.waiting.popleft()
                    self._fail(r, "The request does not fit in the KV cache.")
                    continue
                self._release_pages(r)
                r.reset_for_recompute()
                break
            self.waiting.popleft()
            if not r.ever_admitted:
                r.ever_admitted = True
                r.num_cached_tokens = r.num_computed
                self.prefix_hit_tokens += r.num_computed
                self.prefix_query_tokens += r.num_prompt_tokens
            r.status = Status.RUNNING
            self._prev_prompt = True
            running.append(r)
            n = end - r.num_computed
            chosen.append((r, r.num_computed, n, end == len(r.token_ids)))
            scheduled.add(r.rid)
            budget -= n
        return self._finish_plan(chosen, new_reqs)

    def _finish_plan(self, chosen: list, new_reqs: list) -> Optional[StepPlan]:
        if not chosen:
            return None
        sched = []
        inflight: list = []
        self.inflight.append(inflight)
        SR = ScheduledRequest
        add_sched = sched.append
        add_inflight = inflight.append
        for (r, start, n, sample) in chosen:
            if r.known_to_worker and not r.pages_dirty:     # the common decode step: nothing new to send
                drafts = r.draft_token_ids
                sr = SR(rid=r.rid, start=start, num_tokens=n, new_pages={}, sample=sample,
                        draft_token_ids=list(drafts) if sample and drafts else [])
                add_sched(sr)
                add_inflight((r, sr))
                continue
            new_pages = {}
            if not r.known_to_worker:
                new_reqs.append(self._new_request_data(r))
                r.known_to_worker = True
                r.num_sent_pages = {k: len(t) for k, t in r.pages.items()}
            else:
                for k, t in r.pages.items():
                    sent = r.num_sent_pages.get(k, 0)
                    if len(t) > sent:
                        new_pages[k] = t[sent:]
                        r.num_sent_pages[k] = len(t)
            r.pages_dirty = False
            sr = SR(rid=r.rid, start=start, num_tokens=n, new_pages=new_pages, sample=sample,
                    draft_token_ids=list(r.draft_token_ids) if sample and r.draft_token_ids else [])
            sched.append(sr)
            inflight.append((r, sr))
        if self.overlap:
            self._advance(inflight)
        self.step_id += 1
        removed, self.removed = self.removed, []
        return StepPlan(step_id=self.step_id, new_requests=new_reqs, scheduled=sched,
                        removed_rids=removed)

    def _advance(self, inflight: list) -> None:
        """Overlap: take the plan as done before its result comes back, so that the next plan can be made
        while it runs: its chunks count as computed and each sampled request gets a placeholder for its
        token, which the next step reads on the device. Held until the token is back: a request with a
        grammar until one of its tokens has come back (until then its step may be deferred while the
        grammar compiles, and then yields no token), with drafts, or which surely ends with this token
        (length). (Grammars and penalties need the token on the host: the worker samples such a request
        on the host, after the step in flight; a request that its grammar ended may still be in the next
        plan: the worker samples nothing for it there.)"""
        ctx = self.context_length
        for r, sr in inflight:
            r.num_computed = sr.start + sr.num_tokens
            if not sr.sample:
                continue
            r.pending.append((len(r.token_ids), sr))
            r.token_ids.append(-1)
            sp = r.sampling
            if (sr.draft_token_ids or (sp.grammar is not None and not r.grammar_ready)
                    or len(r.token_ids) - r.num_prompt_tokens >= sp.max_new_tokens or len(r.token_ids) >= ctx):
                r.hold = True

    # ------------------------------------------------------------------------------------------
    # results
    # ------------------------------------------------------------------------------------------
    def _output(self, r: Request, new: list[int], s=None, n: int = 0) -> RequestOutput:
        o = RequestOutput(rid=r.rid, new_token_ids=new, finish_reason=r.finish_reason,
                          matched_stop=r.matched_stop, num_prompt_tokens=r.num_prompt_tokens,
                          num_cached_tokens=r.num_cached_tokens, error=r.error)
        if s is not None:
            if s.logprobs is not None:
                o.logprobs = s.logprobs[:n]
            if s.top_logprobs is not None:
                o.top_logprobs = s.top_logprobs[:n]
            if s.prompt_logprobs is not None:
                o.prompt_logprobs = s.prompt_logprobs
                o.prompt_top_logprobs = s.prompt_top_logprobs
        return o

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        if r.status == Status.RUNNING:
            self.running.remove(r)
        elif r.status == Status.WAITING:
            try:
                self.waiting.remove(r)
            except ValueError:
                pass
        r.status = Status.FINISHED
        self._release_pages(r)
        if r.known_to_worker:
            self.removed.append(r.rid)
            r.known_to_worker = False
        self.requests.pop(r.rid, None)

    def _ends(self, r: Request, t: int, nout: int, length: int) -> bool:
        """Whether token t, r's output number nout (from 0) with the sequence then `length` tokens long, ends
        r; sets its finish reason (and matched stop) when it does."""
        sp = r.sampling
        if t in r.stop_ids and (nout >= sp.min_new_tokens or sp.grammar is not None):
            r.finish_reason, r.matched_stop = "stop", t
        elif nout + 1 >= sp.max_new_tokens or length >= self.context_length:
            r.finish_reason = "length"
        else:
            return False
        return True

    def _fail(self, r: Request, msg: str) -> None:
        r.error = msg
        self._finish(r, "error")
        self.pending.append(self._output(r, []))

    def process_result(self, result: StepResult) -> TokenOutputs:
        outputs, self.pending = self.pending, []
        inflight = self.inflight.popleft() if self.inflight else []
        if self.overlap:
            return self._process_overlapped(result, inflight, outputs)
        if result.error is not None:
            for r, _ in inflight:
                if r.status == Status.RUNNING:
                    r.error = f"Worker error: {result.error}"
                    self._finish(r, "error")
                    outputs.append(self._output(r, []))
            return TokenOutputs(outputs=outputs)
        ctx = self.context_length
        ps = self.page_size
        prefix = self.prefix_enabled
        add_output = outputs.append
        RO = RequestOutput
        for r, sr, s in _with_samples(inflight, result.sampled):
            if s is not None and s.error is not None:      # this request failed in the worker
                self._fail(r, s.error)
                outputs.append(self.pending.pop())
                continue
            if not sr.sample:
                r.num_computed = sr.start + sr.num_tokens
                if self.prefix_enabled:
                    self._register(r)
                if s is not None and s.prompt_logprobs is not None:
                    outputs.append(self._output(r, [], s, 0))
                continue
            if s is not None and s.deferred:
                r.num_computed = sr.start + sr.num_tokens - 1     # recompute the last position
                if s.prompt_logprobs is not None:                  # computed this step: pass them on
                    outputs.append(self._output(r, [], s, 0))
                continue
            if s is None or not s.token_ids:
                self._fail(r, "The worker returned no token.")
                outputs.append(self.pending.pop())
                continue
            sp = r.sampling
            toks = r.token_ids
            got = s.token_ids
            if len(got) == 1:                            # the common case, no loop
                t = got[0]
                toks.append(t)
                new = got
                n = len(toks)
                # _ends, whose answer is no unless t is a stop id or the length is reached
                if t in r.stop_ids or n - r.num_prompt_tokens >= sp.max_new_tokens or n >= ctx:
                    self._ends(r, t, n - 1 - r.num_prompt_tokens, n)
            else:
                new = []
                for t in got:
                    toks.append(t)
                    new.append(t)
                    if self._ends(r, t, len(toks) - 1 - r.num_prompt_tokens, len(toks)):
                        break
            r.num_computed = len(toks) - 1
            # speculative decoding: the drafts the next step verifies, as many as can still be output
            nd = s.next_draft_ids
            if nd and r.finish_reason is None:
                room = min(sp.max_new_tokens - (len(toks) - r.num_prompt_tokens), ctx - len(toks)) - 1
                r.draft_token_ids = list(nd[:max(0, room)])
            elif r.draft_token_ids:
                r.draft_token_ids = []
            if prefix and r.num_computed // ps > r.num_registered:
                self._register(r)
            fin = r.finish_reason
            if fin is not None:
                self._finish(r, fin)
            if s.logprobs is None and s.prompt_logprobs is None:
                add_output(RO(rid=r.rid, new_token_ids=new, finish_reason=fin, matched_stop=r.matched_stop,
                              num_prompt_tokens=r.num_prompt_tokens, num_cached_tokens=r.num_cached_tokens))
            else:
                outputs.append(self._output(r, new, s, len(new)))
        return TokenOutputs(outputs=outputs)

    def _process_overlapped(self, result: StepResult, inflight: list, outputs: list) -> TokenOutputs:
        """process_result under overlap scheduling: the plan's chunks already count as computed
        (_advance); each sampled token takes its placeholder's place. A request that finishes here may
        have one more step in flight: that step's result is ignored (it is no longer running)."""
        RUNNING = Status.RUNNING
        if result.error is not None:
            for r, _ in inflight:
                if r.status == RUNNING:
                    r.error = f"Worker error: {result.error}"
                    self._finish(r, "error")
                    outputs.append(self._output(r, []))
            return TokenOutputs(outputs=outputs)
        ctx = self.context_length
        add_output = outputs.append
        for r, sr, s in _with_samples(inflight, result.sampled):
            if s is not None and s.error is not None:
                self._fail(r, s.error)
                outputs.append(self.pending.pop())
                continue
            if not sr.sample:
                if self.prefix_enabled:
                    self._register(r)
                if s is not None and s.prompt_logprobs is not None:
                    outputs.append(self._output(r, [], s, 0))
                continue
            if not r.pending or r.pending[0][1] is not sr:
                continue                     # preempted since (its placeholders were dropped)
            pos = r.pending.pop(0)[0]
            if s is not None and s.deferred:      # a grammar still compiling: recompute the last position
                del r.token_ids[pos:]
                r.pending, r.hold = [], False
                r.num_computed = pos - 1
                if s.prompt_logprobs is not None:
                    outputs.append(self._output(r, [], s, 0))
                continue
            if s is None or len(s.token_ids) != 1:
                self._fail(r, "The worker returned no token." if s is None or not s.token_ids
                           else "Overlap scheduling got several tokens for one step.")
                outputs.append(self.pending.pop())
                continue
            t = s.token_ids[0]
            r.token_ids[pos] = t
            r.grammar_ready = True
            # _ends, whose answer is no unless t is a stop id or the length is reached
            if t in r.stop_ids or pos + 1 - r.num_prompt_tokens >= r.sampling.max_new_tokens or pos + 1 >= ctx:
                self._ends(r, t, pos - r.num_prompt_tokens, pos + 1)
            if not r.pending:
                r.hold = False
            if self.prefix_enabled and min(r.num_computed, pos + 1) // self.page_size > r.num_registered:
                self._register_known(r, pos + 1)
            fin = r.finish_reason
            if fin is not None:
                self._finish(r, fin)
            if s.logprobs is None and s.top_logprobs is None and s.prompt_logprobs is None:
                add_output(RequestOutput(rid=r.rid, new_token_ids=[t], finish_reason=fin, matched_stop=r.matched_stop,
                                         num_prompt_tokens=r.num_prompt_tokens, num_cached_tokens=r.num_cached_tokens,
                                         error=r.error))
            else:
                add_output(self._output(r, [t], s, 1))
        return TokenOutputs(outputs=outputs)

    def _register_known(self, r: Request, known: int) -> None:
        """_register over the computed positions whose tokens are known (not placeholders)."""
        n = r.num_computed
        r.num_computed = min(n, known)
        try:
            self._register(r)
        finally:
            r.num_computed = n


def _with_samples(inflight, sampled):
    """(request, its scheduled entry, its SampledTokens or None) for each request of a step still running when
    reached: the worker keeps the plan's order, so the k-th sample is normally the k-th request's; else (a
    request dropped by the worker) a lookup by id."""
    n = len(sampled)
    by_rid = None
    for k, (r, sr) in enumerate(inflight):
        if r.status is not Status.RUNNING:
            continue
        if k < n and sampled[k].rid == r.rid:
            s = sampled[k]
        else:
            if by_rid is None:
                by_rid = {x.rid: x for x in sampled}
            s = by_rid.get(r.rid)
        yield r, sr, s
