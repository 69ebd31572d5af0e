"""Host overhead per decode step: scheduler (schedule + process_result), the engine->front-door
frame (msgspec encode + decode of TokenOutputs) and the front door (routing, incremental
detokenization, stop strings, one SSE chunk per request), with the NoopRunner (no model).

    python bench/host_overhead.py [--batches 1 64 256] [--steps 400] [--write bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import asyncio
import msgspec
import os
import platform
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gemma4rt.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from gemma4rt.protocol import AddRequest, SamplingParams, TokenOutputs  # noqa: E402
from gemma4rt.runtime.mailbox import decode_body, encode_frame  # noqa: E402
from gemma4rt.scheduler import Scheduler  # noqa: E402
from gemma4rt.worker.noop_runner import NoopRunner, noop_tokenizer_path  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_batch(batch: int, steps: int, fd_parts) -> dict:
    cfg = EngineConfig(runner="noop", context_length=1 << 20,
                       cache=CacheConfig(page_size=16, max_total_tokens=batch * (steps + 64) + 4096),
                       scheduler=SchedulerConfig(max_running_requests=batch, chunked_prefill_size=1 << 20))
    runner = NoopRunner(cfg)
    sched = Scheduler(cfg.scheduler, cfg.cache, runner.pool_specs, runner.model_info)
    for i in range(batch):
        sched.add_request(AddRequest(rid=f"r{i}", prompt_token_ids=[2] + [10 + i % 50] * 31,
                                     sampling=SamplingParams(max_new_tokens=steps + 10, temperature=0.0,
                                                             ignore_eos=True)))
    plan = sched.schedule()                      # the prefill step (not timed)
    sched.process_result(runner.execute(plan))
    fd_init, fd_step = fd_parts
    states = fd_init(batch)
    t_sched = t_ipc = t_fd = 0.0
    pc = time.perf_counter
    for _ in range(steps):
        a = pc()
        plan = sched.schedule()
        b = pc()
        res = runner.execute(plan)
        c = pc()
        out = sched.process_result(res)
        d = pc()
        frame = encode_frame(out)
        out2 = decode_body(frame[4], memoryview(frame)[5:])
        e = pc()
        fd_step(states, out2)
        f = pc()
        t_sched += (b - a) + (d - c)
        t_ipc += e - d
        t_fd += f - e
    assert len(plan.scheduled) == batch
    ms = 1000.0 / steps
    return {"batch": batch, "scheduler_ms": t_sched * ms, "ipc_ms": t_ipc * ms, "frontdoor_ms": t_fd * ms,
            "total_ms": (t_sched + t_ipc + t_fd) * ms}


def frontdoor_parts():
    """The per-step work of the front door, as in FrontDoor.on_outputs + generate() + the SSE chunk."""
    from transformers import AutoTokenizer

    from gemma4rt.frontend.textproc import IncrementalDetokenizer, StopStrings
    tok = AutoTokenizer.from_pretrained(noop_tokenizer_path())

    def init(batch):
        return {f"r{i}": (IncrementalDetokenizer(tok), StopStrings(["\n\n"]), asyncio.Queue())
                for i in range(batch)}

    def step(states, outs: TokenOutputs):
        for o in outs.outputs:
            detok, stop, q = states[o.rid]
            q.put_nowait(o)
            o = q.get_nowait()
            text = stop.feed(detok.add(o.new_token_ids))
            msgspec.json.encode({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                     "finish_reason": None}]})
    return init, step


def write_results(path: str, rows: list[dict], cpu: str, steps: int) -> None:
    lines = ["## Host overhead", "",
             f"`python bench/host_overhead.py` (NoopRunner, {steps} decode steps per batch size, greedy, "
             f"one process, wall time per step). CPU: {cpu}; Python {platform.python_version()}.", "",
             "| batch | scheduler (ms) | engine->front-door frame (ms) | front door (ms) | total (ms) |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['scheduler_ms']:.3f} | {r['ipc_ms']:.3f} | {r['frontdoor_ms']:.3f} "
                     f"| {r['total_ms']:.3f} |")
    goal = {1: 0.1, 256: 0.5}
    verdict = [f"batch {r['batch']}: {'met' if r['total_ms'] < goal[r['batch']] else 'NOT met'}"
               for r in rows if r["batch"] in goal]
    lines += ["", "Goal: scheduler + front door < 0.1 ms per step at batch 1, < 0.5 ms at batch 256 "
              f"({'; '.join(verdict)}).",
              "The scheduler runs in the engine process between steps; the front door (detokenization, stop",
              "strings, SSE) runs in the main process concurrently with the next step.", ""]
    section = "\n".join(lines)
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
    if "## Host overhead" in text:
        text = re.sub(r"## Host overhead\n.*?(?=\n## |\Z)", section.rstrip("\n") + "\n", text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--write", default=None, help="update the 'Host overhead' section of this markdown file")
    a = ap.parse_args()
    parts = frontdoor_parts()
    rows = []
    for b in a.batches:
        bench_batch(b, 20, parts)                # warm-up
        r = bench_batch(b, a.steps, parts)
        rows.append(r)
        print(f"batch {b:4d}: scheduler {r['scheduler_ms']:.3f} ms  frame {r['ipc_ms']:.3f} ms  "
              f"front door {r['frontdoor_ms']:.3f} ms  total {r['total_ms']:.3f} ms")
    cpu = cpu_model()
    print("CPU:", cpu)
    if a.write:
        write_results(a.write, rows, cpu, a.steps)


if __name__ == "__main__":
    main()
