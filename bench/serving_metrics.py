"""Per-request records and the aggregate metrics of bench/serving.py (performance-targets.md §2.1-2.2).

Times are seconds from time.perf_counter(). For one request:
  ttft      = first chunk carrying generated tokens - start (the POST)
  latency   = end of the stream - start (E2E; SGLang counts the final [DONE] too)
  itl       = per token: each chunk's gap spread evenly over the tokens it carries
  itl_chunk = per chunk: one gap per content chunk after the first
  TPOT      = (latency - ttft) / (output_len - 1), for requests with output_len > 1
Aggregates over successful requests: request / input / output / total token throughput over the
benchmark duration, peak output throughput (most tokens emitted in one 1-second bin since the start),
concurrency = sum(latency) / duration (Little's law), peak concurrent requests (sweep over
[start, start + latency)). Percentiles are numpy's linear ones, as in SGLang and vLLM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class RequestRecord:
    prompt_len: int = 0                      # the dataset's input length
    server_prompt_len: Optional[int] = None  # usage.prompt_tokens / meta_info.prompt_tokens
    output_len: int = 0                      # usage.completion_tokens / meta_info.completion_tokens
    success: bool = False
    error: str = ""
    start: float = 0.0                       # perf_counter at the POST
    ttft: float = 0.0
    latency: float = 0.0
    first_chunk_tokens: int = 1              # tokens carried by the first content chunk
    itl: list[float] = field(default_factory=list)
    itl_chunk: list[float] = field(default_factory=list)
    usage_missing: bool = False              # output_len fell back to the requested max tokens

    def token_times(self) -> list[float]:
        """Absolute emission time of each output token (first chunk's tokens at start + ttft)."""
        t = self.start + self.ttft
        times = [t] * max(1, self.first_chunk_tokens)
        for gap in self.itl:
            t += gap
            times.append(t)
        return times


def _stats(name: str, values: list[float], scale: float, out: dict, pcts=(90, 95, 99)) -> None:
    arr = np.asarray(values, dtype=np.float64) * scale
    if arr.size == 0:
        for k in ("mean", "median", "std", "max") + tuple(f"p{p}" for p in pcts):
            out[f"{k}_{name}"] = 0.0
        return
    out[f"mean_{name}"] = float(arr.mean())
    out[f"median_{name}"] = float(np.median(arr))
    out[f"std_{name}"] = float(arr.std())
    out[f"max_{name}"] = float(arr.max())
    for p in pcts:
        out[f"p{p}_{name}"] = float(np.percentile(arr, p))


def peak_output_throughput(records: list[RequestRecord], bench_start: float, bin_s: float = 1.0) -> float:
    """Most output tokens emitted in one bin [k, k+1) seconds after bench_start, per second."""
    counts: dict[int, int] = {}
    for r in records:
        if not r.success:
            continue
        for t in r.token_times():
            k = int(math.floor((t - bench_start) / bin_s))
            counts[k] = counts.get(k, 0) + 1
    return max(counts.values()) / bin_s if counts else 0.0


def peak_concurrency(records: list[RequestRecord]) -> int:
    events = []
    for r in records:
        if r.success:
            events.append((r.start, 1))
            events.append((r.start + r.latency, -1))
    events.sort(key=lambda e: (e[0], e[1]))       # an end at t frees its slot before a start at t
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def compute_metrics(records: list[RequestRecord], duration: float, bench_start: float) -> dict:
    ok = [r for r in records if r.success]
    m: dict = {"completed": len(ok), "failed": len(records) - len(ok), "duration": duration}
    m["total_input_tokens"] = sum(r.prompt_len for r in ok)
    served = [r.server_prompt_len for r in ok]
    m["total_input_tokens_server"] = sum(served) if ok and all(s is not None for s in served) else None
    m["total_output_tokens"] = sum(r.output_len for r in ok)
    m["num_usage_missing"] = sum(r.usage_missing for r in ok)
    # image prompts: the server's count includes the vision tokens that the dataset does not know
    input_tokens = m["total_input_tokens_server"]
    if input_tokens is None:
        input_tokens = m["total_input_tokens"]
    d = duration if duration > 0 else float("nan")
    m["request_throughput"] = len(ok) / d
    m["input_throughput"] = input_tokens / d
    m["output_throughput"] = m["total_output_tokens"] / d
    m["total_throughput"] = (input_tokens + m["total_output_tokens"]) / d
    m["peak_output_throughput"] = peak_output_throughput(records, bench_start)
    m["peak_concurrent_requests"] = peak_concurrency(records)
    m["concurrency"] = sum(r.latency for r in ok) / d
    _stats("e2e_latency_ms", [r.latency for r in ok], 1000.0, m)
    _stats("ttft_ms", [r.ttft for r in ok], 1000.0, m)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    _stats("tpot_ms", tpots, 1000.0, m)
    _stats("itl_ms", [g for r in ok for g in r.itl], 1000.0, m)
    _stats("itl_chunk_ms", [g for r in ok for g in r.itl_chunk], 1000.0, m)
    errors: dict[str, int] = {}
    for r in records:
        if not r.success:
            errors[r.error[:200]] = errors.get(r.error[:200], 0) + 1
    m["errors"] = errors
    return m


def format_table(m: dict, cfg: dict) -> str:
    """The SGLang-style result block."""
    rows: list = [("=", " Serving Benchmark Result ")]

    def kv(label, value, fmt="{:.2f}"):
        if value is None:
            value = "n/a"
        elif isinstance(value, float):
            value = fmt.format(value)
        rows.append((f"{label}:", str(value)))

    kv("Backend", cfg.get("backend"))
    kv("Traffic request rate", cfg.get("request_rate"))
    kv("Max request concurrency", cfg.get("max_concurrency") or "not set")
    kv("Successful requests", m["completed"])
    kv("Failed requests", m["failed"])
    kv("Benchmark duration (s)", m["duration"])
    kv("Total input tokens", m["total_input_tokens"])
    kv("Total input tokens (server)", m["total_input_tokens_server"])
    kv("Total generated tokens", m["total_output_tokens"])
    kv("Request throughput (req/s)", m["request_throughput"])
    kv("Input token throughput (tok/s)", m["input_throughput"])
    kv("Output token throughput (tok/s)", m["output_throughput"])
    kv("Peak output token throughput (tok/s)", m["peak_output_throughput"])
    kv("Peak concurrent requests", m["peak_concurrent_requests"])
    kv("Total token throughput (tok/s)", m["total_throughput"])
    kv("Concurrency", m["concurrency"])
    if m.get("accept_length") is not None:          # speculative decoding, as the server reports it
        kv("Accept length", m["accept_length"])
    sections = [
        ("End-to-End Latency", "E2E Latency", "e2e_latency_ms", ("mean", "median", "std", "p90", "p99")),
        ("Time to First Token", "TTFT", "ttft_ms", ("mean", "median", "std", "p99")),
        ("Time per Output Token (excl. 1st token)", "TPOT", "tpot_ms", ("mean", "median", "std", "p99")),
        ("Inter-Token Latency (per token)", "ITL", "itl_ms", ("mean", "median", "p95", "p99", "max")),
        ("Inter-Chunk Latency (per SSE chunk)", "ITL/chunk", "itl_chunk_ms", ("mean", "median", "p95", "p99", "max")),
    ]
    for title, label, key, stats in sections:
        rows.append(("-", f"{title}"))
        for s in stats:
            kv(f"{s.upper() if s.startswith('p') else s.capitalize()} {label} (ms)", m[f"{s}_{key}"])
    rows.append(("=", ""))
    lines = []
    for a, b in rows:
        if a in ("=", "-"):
            lines.append(b.center(56, a) if b else a * 56)
        else:
            lines.append(f"{a:<42}{b}")
    if m.get("errors"):
        lines.append("errors: " + "; ".join(f"{n}x {e}" for e, n in m["errors"].items()))
    return "\n".join(lines)
