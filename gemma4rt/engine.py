"""Engine: the synchronous in-process engine (scheduler + rank-0 runner in one loop).

Used by the offline `gemma4rt.LLM` API and, wrapped by an actor, by the server's engine process.
One `step()` = schedule -> runner.execute(plan) -> process_result.
"""
from __future__ import annotations

import logging
from typing import Optional

from gemma4rt.config import EngineConfig
from gemma4rt.protocol import AddRequest, SchedulerStats, StepResult, TokenOutputs
from gemma4rt.scheduler import Scheduler

log = logging.getLogger(__name__)


def build_runner(engine_cfg: EngineConfig):
    """The runner named by engine_cfg.runner: "noop" (no model) or the real ModelRunner."""
    if engine_cfg.runner == "noop":
        from gemma4rt.worker.noop_runner import NoopRunner
        return NoopRunner(engine_cfg)
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
        return self.scheduler.has_work()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def step(self) -> TokenOutputs:
        plan = self.scheduler.schedule()
        if plan is None:
            return self.scheduler.pop_outputs()
        try:
            result = self.runner.execute(plan)
        except Exception as e:          # a failed step fails its requests, not the engine
            log.exception("step %d failed", plan.step_id)
            result = StepResult(step_id=plan.step_id, sampled=[], error=f"{type(e).__name__}: {e}")
        self.num_steps += 1
        return self.scheduler.process_result(result)
