"""Engine: the synchronous in-process engine (scheduler + rank-0 runner in one loop).

Used by the offline `gemma4rt.LLM` API and, wrapped by an actor, by the server's engine process.
One `step()` = schedule -> runner.execute(plan) -> process_result.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from gemma4rt.config import EngineConfig
from gemma4rt.protocol import AddRequest, SchedulerStats, StepResult, TokenOutputs
from gemma4rt.scheduler import Scheduler
from gemma4rt.worker.profiling import StepProfiler, prompt_tokens

log = logging.getLogger(__name__)


def build_runner(engine_cfg: EngineConfig):
    """The runner named by engine_cfg.runner: "noop" (no model) or the real ModelRunner."""
    if engine_cfg.runner == "noop":
        from gemma4rt.worker.noop_runner import NoopRunner
        return NoopRunner(engine_cfg)
    if engine_cfg.parallel.tp > 1:
        from gemma4rt.worker.tp_worker import start_tp_runner
        return start_tp_runner(engine_cfg)
    from gemma4rt.worker.model_runner import ModelRunner
    return ModelRunner(engine_cfg)


class Engine:
    def __init__(self, engine_cfg: EngineConfig, runner=None):
        self.engine_cfg = engine_cfg
        self.runner = runner if runner is not None else build_runner(engine_cfg)
        self.model_info = self.runner.model_info
        self.pool_specs = list(self.runner.pool_specs)
        self.scheduler = Scheduler(engine_cfg.scheduler, engine_cfg.cache, self.pool_specs, self.model_info)
        self.num_steps = 0
        self.step_log = StepLog(self.scheduler, self.runner)
        sc = engine_cfg.scheduler
        want = sc.overlap_schedule
        if want is None:            # the default: where the runner computes on a GPU
            dev = getattr(self.runner, "device", None)
            want = dev is not None and getattr(dev, "type", None) == "cuda"
        self.overlap = bool(want) and not sc.disable_overlap_schedule and hasattr(self.runner, "launch")
        if self.overlap and (engine_cfg.parallel.tp > 1 or engine_cfg.ple_on_host
                             or engine_cfg.speculative.draft_model_path):
            # the other ranks follow rank 0's plans with the tokens it broadcasts; --ple-on-host gathers
            # each step's per-layer-embedding rows by token id on the host; drafts need the newest token
            log.info("overlap scheduling is off: it needs --tp 1, no --ple-on-host and no speculative decoding")
            self.overlap = False
        self.scheduler.overlap = self.overlap
        self._in_flight = None          # overlap: (plan, launched step) whose result is not processed yet
        self.profiler = StepProfiler.from_env()     # GEMMA4RT_PROFILE_STEPS: a kernel profile of some steps
        self._last_plan = None

    @property
    def tokenizer_path(self) -> str:
        return self.runner.tokenizer_path

    def add_request(self, req: AddRequest) -> Optional[str]:
        return self.scheduler.add_request(req)

    def abort(self, rid: str) -> bool:
        return self.scheduler.abort_request(rid)

    def flush_cache(self) -> bool:
        return self.scheduler.flush_cache()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def stats(self) -> SchedulerStats:
        s = self.scheduler.stats()
        if getattr(self.runner, "drafter", None) is not None:
            s.spec_verifications, s.spec_accepted = self.runner.spec_verify_rows, self.runner.spec_accepted
        return s

    def step(self) -> TokenOutputs:
        if self.profiler is None:
            return self._step()
        n = self.num_steps
        self.profiler.before(n)
        out = self._step()
        if self.num_steps > n:
            self.profiler.after(n, self._last_plan)
        return out

    def _step(self) -> TokenOutputs:
        if self.overlap:
            return self._step_overlapped()
        plan = self.scheduler.schedule()
        self._last_plan = plan
        if plan is None:
            return self.scheduler.pop_outputs()
        t0 = time.perf_counter()
        try:
            result = self.runner.execute(plan)
        except Exception as e:          # a failed step fails its requests, not the engine
            log.exception("step %d failed", plan.step_id)
            result = StepResult(step_id=plan.step_id, sampled=[], error=f"{type(e).__name__}: {e}")
        self.num_steps += 1
        self.step_log.record(plan, time.perf_counter() - t0, self._take_gpu_ms())
        return self.scheduler.process_result(result)


    def _step_overlapped(self) -> TokenOutputs:
        """Overlap scheduling: make and launch plan k while step k-1 still runs on the device, then
        wait for step k-1's tokens and process them. The scheduler takes each plan as done when it is
        made (placeholders for the sampled tokens, which the next step reads on the device)."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        self._last_plan = plan
        launched = None
        if plan is not None:
            try:
                launched = self.runner.launch(plan)
            except Exception as e:
                log.exception("step %d failed", plan.step_id)
                launched = StepResult(step_id=plan.step_id, sampled=[], error=f"{type(e).__name__}: {e}")
            self.num_steps += 1
        prev, self._in_flight = self._in_flight, (plan, launched) if plan is not None else None
        if prev is None:
            return self.scheduler.pop_outputs()
        p_plan, p_launched = prev
        result = p_launched
        if not isinstance(result, StepResult):
            try:
                result = self.runner.collect(p_launched)
            except Exception as e:
                log.exception("step %d failed", p_plan.step_id)
                result = StepResult(step_id=p_plan.step_id, sampled=[], error=f"{type(e).__name__}: {e}")
        self.step_log.record(p_plan, time.perf_counter() - t0, self._take_gpu_ms())
        return self.scheduler.process_result(result)


    def _take_gpu_ms(self) -> Optional[float]:
        """The device time of the step the runner has just finished (None when it did not time one)."""
        ms = getattr(self.runner, "last_step_gpu_ms", None)
        if ms is not None:
            self.runner.last_step_gpu_ms = None
        return ms


class StepLog:
    """Every `interval` seconds with steps in it, one INFO line (as SGLang's batch logs): steps and
    seconds spent in steps with prompt tokens and in pure decode steps, prompt tokens and media
    requests prefilled, decode rows per step, generated tokens per second, running and waiting. Where the
    runner times its steps on the device (`last_step_gpu_ms`, CUDA events from a step's first launch to its
    sampled tokens' copy), the decode and prompt steps' mean device time too: a step period well above it
    is host time or an idle device."""

    def __init__(self, scheduler, runner=None, interval: float = 5.0):
        self.scheduler, self.runner, self.interval = scheduler, runner, interval
        self._spec_seen = (0, 0, 0)
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.t0 = now
        self.p_steps = self.p_tokens = self.d_steps = self.d_rows = self.media = 0
        self.p_s = self.d_s = 0.0
        self.p_gpu = [0.0, 0]           # device ms summed, steps timed
        self.d_gpu = [0.0, 0]

    def record(self, plan, seconds: float, gpu_ms: Optional[float] = None) -> None:
        if not log.isEnabledFor(logging.INFO):
            return                  # nothing to show: no per-row work on the step path
        prompt = prompt_tokens(plan)
        if prompt:
            self.p_steps += 1
            self.p_tokens += prompt
            self.p_s += seconds
            self.media += sum(1 for n in plan.new_requests if n.mm_items)
            acc = self.p_gpu
        else:
            self.d_steps += 1
            self.d_rows += len(plan.scheduled)
            self.d_s += seconds
            acc = self.d_gpu
        if gpu_ms is not None:
            acc[0] += gpu_ms
            acc[1] += 1
        now = time.perf_counter()
        if now - self.t0 >= self.interval:
            span = now - self.t0
            sc = self.scheduler
            gpu = "".join(f", {name} {acc[0] / acc[1]:.2f} ms/step on the device" for name, acc in
                          (("prefill", self.p_gpu), ("decode", self.d_gpu)) if acc[1])
            log.info("steps in %.1f s: prefill %d (%d prompt tokens, %d with media, %.2f s), decode %d "
                     "(%.1f rows/step, %.2f ms/step), gen %.0f tok/s; running %d, waiting %d%s",
                     span, self.p_steps, self.p_tokens, self.media, self.p_s, self.d_steps,
                     self.d_rows / max(1, self.d_steps), 1e3 * self.d_s / max(1, self.d_steps),
                     self.d_rows / span, len(sc.running), len(sc.waiting), gpu)
            r = self.runner
            if getattr(r, "drafter", None) is not None:
                cur = (r.spec_verify_rows, r.spec_drafted, r.spec_accepted)
                rows, drafted, acc = (c - p for c, p in zip(cur, self._spec_seen))
                self._spec_seen = cur
                if rows:
                    log.info("speculative: %d verifications, %d of %d drafts accepted, %.2f tokens per "
                             "verification", rows, acc, drafted, 1 + acc / rows)
            self._reset(now)
