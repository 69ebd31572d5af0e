"""Kernel profiles of engine steps: the table `bench.one_batch --profile` prints, and the server's own
profile window (GEMMA4RT_PROFILE_STEPS=START:COUNT:PATH profiles that many engine steps from that step
on, in the engine process, and writes the same table to PATH)."""
from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger(__name__)


def prompt_tokens(plan) -> int:
    """Tokens of a step plan's prompt chunks (a step with any is a prompt step; one token a request, with or
    without drafts, is decode)."""
    return sum(s.num_tokens for s in plan.scheduled if s.num_tokens > 1 + len(s.draft_token_ids))


def kernel_table(prof, steps: int, top: int = 25) -> tuple[list[str], float, float]:
    """(lines of `us/step calls/step us/call kernel` for the `top` kernels by total time, GPU kernel ms per
    step, kernel launches per step) of a finished torch.profiler run over `steps` steps."""
    import torch
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            kernels.setdefault(ev.name, []).append(ev.device_time_total)
    n = max(1, steps)
    gpu_ms = sum(sum(v) for v in kernels.values()) / 1e3 / n
    launches = sum(len(v) for v in kernels.values()) / n
    lines = [f"{'us/step':>9} {'calls/step':>10} {'us/call':>8}  kernel"]
    for name, v in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"{sum(v) / n:>9.1f} {len(v) / n:>10.1f} {sum(v) / len(v):>8.1f}  {name[:110]}")
    return lines, gpu_ms, launches


def parse_window(spec: Optional[str]) -> Optional[tuple[int, int, str]]:
    """GEMMA4RT_PROFILE_STEPS = "START:COUNT:PATH" -> (start, count, path); None when unset or empty."""
    if not spec:
        return None
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or not parts[2] or int(parts[1]) < 1:
        raise ValueError(f"GEMMA4RT_PROFILE_STEPS={spec!r}: expected START:COUNT:PATH, e.g. 2000:20:/tmp/prof.txt")
    return int(parts[0]), int(parts[1]), parts[2]


class StepProfiler:
    """Profiles engine steps [start, start + count) and writes the kernel table with the window's step
    mix (steps carrying prompt tokens, pure decode steps and their mean rows) and wall time."""

    def __init__(self, window: tuple[int, int, str]):
        self.start, self.count, self.path = window
        self.prof = None
        self.t0 = 0.0
        self.prompt_steps = self.decode_steps = self.decode_rows = self.prompt_tokens = 0

    @classmethod
    def from_env(cls) -> Optional["StepProfiler"]:
        w = parse_window(os.environ.get("GEMMA4RT_PROFILE_STEPS"))
        return cls(w) if w else None

    def before(self, step_no: int) -> None:
        if step_no != self.start or self.prof is not None:
            return
        import time

        import torch
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=acts)
        self.prof.__enter__()
        self.t0 = time.perf_counter()
        log.info("profiling engine steps %d-%d", self.start, self.start + self.count - 1)

    def after(self, step_no: int, plan) -> None:
        """Called after step `step_no` (numbered as before()) ran `plan` (None: nothing scheduled)."""
        if self.prof is None or self.path is None:
            return
        if plan is not None:
            prompt = prompt_tokens(plan)
            if prompt:
                self.prompt_steps += 1
                self.prompt_tokens += prompt
            else:
                self.decode_steps += 1
                self.decode_rows += len(plan.scheduled)
        if step_no + 1 < self.start + self.count:
            return
        import time

        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        lines, gpu_ms, launches = kernel_table(self.prof, self.count)
        wall_ms = 1e3 * wall / self.count
        head = (f"engine steps {self.start}-{self.start + self.count - 1}: {self.prompt_steps} with prompt tokens "
                f"({self.prompt_tokens} tokens), {self.decode_steps} pure decode "
                f"({self.decode_rows / max(1, self.decode_steps):.1f} rows/step); wall {wall_ms:.3f} ms/step, GPU "
                f"kernel time {gpu_ms:.3f} ms/step ({100 * gpu_ms / max(1e-9, wall_ms):.0f}% busy), "
                f"{launches:.0f} kernels/step")
        try:
            with open(self.path, "w") as f:
                f.write("\n".join([head] + lines) + "\n")
            log.info("profile written to %s: %s", self.path, head)
        except OSError as e:
            log.warning("cannot write the profile to %s: %s", self.path, e)
        self.prof, self.path = None, None
