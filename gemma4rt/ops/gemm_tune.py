"""Per-shape choice of the decode GEMM, measured on the running GPU at start-up (GEMMA4RT_GEMM_TUNE=1;
experimental and off by default: it has not yet run on a GPU).

For each weight the decode step multiplies through ops.linear / ops.linear_gelu_mul (every text-model and
drafter Linear, each fused MLP gate|up, the tied LM head) and each row count 1-8, the native skinny GEMM's
default choice, its CUDA-core and tensor-core kernels and cuBLAS (then gelu-and-mul for gate|up) are timed
on the real weight, and linear.CHOICE records a kernel where it beats the default by MIN_GAIN. Why: on an
H200 neither native kernel is the fastest everywhere (cuBLAS reads the 31B's 231 MB down projection in 58.5
µs at one row against 65-73 µs) and other cards will differ. The choice is fixed before the CUDA graphs are
captured."""
from __future__ import annotations

import importlib
import logging
import math
import os
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from gemma4rt.ops.activation import gelu_tanh_and_mul

lin = importlib.import_module("gemma4rt.ops.linear")    # the module (gemma4rt.ops.linear is also a function)
log = logging.getLogger(__name__)

MIN_GAIN = 0.03                  # a kernel replaces the default only when this much faster
NAMES = {0: "default", lin.CUDA_CORES: "CUDA cores", lin.TENSOR_CORES: "tensor cores", lin.CUBLAS: "cuBLAS"}


def enabled() -> bool:
    return os.environ.get("GEMMA4RT_GEMM_TUNE", "0") == "1"


def pick(times: dict[int, float], min_gain: float = MIN_GAIN) -> int:
    """times: kernel -> µs, 0 being the default choice. The fastest kernel when it beats the default by
    min_gain, else 0 (keep the default: timing noise must not flip the choice)."""
    best = min(times, key=times.get)
    return best if best != 0 and times[best] < times[0] * (1.0 - min_gain) else 0


def decode_weights(*models: torch.nn.Module) -> list[tuple[torch.Tensor, bool]]:
    """(weight, glu) for what the decode step multiplies through ops.linear / ops.linear_gelu_mul."""
    from gemma4rt.model.text import MLP, Gemma4TextModel, Linear
    out, glu_ids = [], set()
    for model in models:
        if model is None:
            continue
        for m in model.modules():
            if isinstance(m, MLP) and hasattr(m, "gate_up_proj"):
                out.append((m.gate_up_proj.weight, True))
                glu_ids.add(id(m.gate_up_proj))
        for m in model.modules():
            if isinstance(m, Linear) and id(m) not in glu_ids:
                out.append((m.weight, False))
            elif isinstance(m, Gemma4TextModel):
                out.append((m.embed_tokens.weight, False))
    return out


def _time_us(fn: Callable[[], object], reps: int) -> float:
    """Best of 3 runs of reps back-to-back calls, by CUDA events (µs per call)."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(3):
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1000.0 / reps)
    return best


def _candidates(x: torch.Tensor, w: torch.Tensor, glu: bool) -> dict[int, Callable[[], object]]:
    if glu:
        c = {k: (lambda k=k: lin.gemv_gelu_mul(x, w, k)) for k in (0, lin.CUDA_CORES, lin.TENSOR_CORES)}
        c[lin.CUBLAS] = lambda: gelu_tanh_and_mul(F.linear(x, w))
    else:
        c = {k: (lambda k=k: lin.gemv(x, w, k)) for k in (0, lin.CUDA_CORES, lin.TENSOR_CORES)}
        c[lin.CUBLAS] = lambda: F.linear(x, w)
    return c


def tune(weights: Iterable[tuple[torch.Tensor, bool]], reps: int = 10,
         timer: Callable[[Callable[[], object], int], float] = _time_us) -> dict[tuple[int, int, bool, int], int]:
    """The choice table for these weights (each distinct shape once), to be assigned to linear.CHOICE."""
    choice: dict[tuple[int, int, bool, int], int] = {}
    seen = set()
    for w, glu in weights:
        key = (w.shape[0], w.shape[1], glu, w.dtype, w.device)
        if key in seen or w.dim() != 2 or (glu and w.shape[0] % 2):
            continue
        seen.add(key)
        for m in range(1, lin.GEMV_MAX_ROWS + 1):
            x = torch.randn(m, w.shape[1], dtype=w.dtype, device=w.device)
            if not lin.gemv_ok(x, w):
                break
            times = {k: timer(f, reps) for k, f in _candidates(x, w, glu).items()}
            k = pick(times)
            if k:
                choice[(w.shape[0], w.shape[1], glu, m)] = k
                log.debug("GEMM %dx%d%s, %d rows: %s %.1f µs (default %.1f µs)", w.shape[0], w.shape[1],
                          " gate|up" if glu else "", m, NAMES[k], times[k], times[0])
    return choice


def tune_models(*models: torch.nn.Module) -> None:
    """Fill linear.CHOICE for these models' decode GEMMs (logged), when enabled()."""
    if not enabled():
        return
    t0 = time.perf_counter()
    table = tune(decode_weights(*models))
    lin.CHOICE.update(table)
    counts = {NAMES[k]: sum(1 for v in table.values() if v == k) for k in (1, 2, 3)}
    log.info("GEMM tuning (%.1f s): %d (shape, rows) pairs leave the default: %s", time.perf_counter() - t0,
             len(table), ", ".join(f"{n} {c}" for n, c in counts.items() if c) or "none")
