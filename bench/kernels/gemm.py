"""Skinny GEMM (decode projections, 1-8 rows) microbenchmarks: the native gemv (the tensor-core kernel,
GEMMA4RT_GEMV_MMA=1, and the CUDA-core kernel, =0; by default 1-2 rows take the second) against torch's
F.linear (cuBLAS) on Gemma 4 weight shapes, as fractions of the copy bandwidth (the weight read dominates the
bytes). Gate/up shapes also run the fused gelu-and-mul variant (gemv_gelu_mul), against F.linear's
projection alone."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from bench.kernels.common import row, time_us

# (name, N, K, glu): E2B MLP gate|up and down, E2B q|k|v, 26B-A4B dense gate|up, 31B MLP gate|up and down,
# the 262144-row LM head of E2B
SHAPES = (("E2B gate_up", 12288, 1536, True), ("E2B down", 1536, 6144, False), ("E2B qkv", 2560, 1536, False),
          ("26B gate_up", 4224, 2816, True), ("31B gate_up", 43008, 5376, True), ("31B down", 5376, 21504, False),
          ("E2B lm_head", 262144, 1536, False))


def _time_both(fn):
    """(tensor-core µs, CUDA-core µs), each kernel forced (the switch is read at each launch)."""
    saved = os.environ.get("GEMMA4RT_GEMV_MMA")
    try:
        os.environ["GEMMA4RT_GEMV_MMA"] = "1"
        t = time_us(fn)
        os.environ["GEMMA4RT_GEMV_MMA"] = "0"
        return t, time_us(fn)
    finally:
        if saved is None:
            del os.environ["GEMMA4RT_GEMV_MMA"]
        else:
            os.environ["GEMMA4RT_GEMV_MMA"] = saved


def run(ceil, quick=False):
    rows = []
    dt = torch.bfloat16
    for name, N, K, glu in (SHAPES[:2] if quick else SHAPES):
        w = torch.randn(N, K, device="cuda", dtype=dt)
        for M in ((1, 8) if quick else (1, 2, 4, 8)):
            x = torch.randn(M, K, device="cuda", dtype=dt)
            nbytes = (N * K + M * K + M * N) * 2
            ref = time_us(lambda: F.linear(x, w))
            out = torch.empty(M, N, device="cuda", dtype=dt)
            ops = [("gemv", lambda: torch.ops.gemma4rt.gemv(x, w, out))]
            if glu:
                half = torch.empty(M, N // 2, device="cuda", dtype=dt)
                ops.append(("gemv+gelu", lambda: torch.ops.gemma4rt.gemv_gelu_mul(x, w, half)))
            for op, fn in ops:
                t_mma, t_cc = _time_both(fn)
                geo = f"{name} M={M} N={N} K={K}"
                rows.append(row("gemm", op, geo, t_mma, nbytes, 2 * M * N * K, ceil, ref, ref_name="F.linear"))
                rows.append(row("gemm", f"{op} cuda-cores", geo, t_cc, nbytes, 2 * M * N * K, ceil, t_mma,
                                ref_name="tensor-core"))
    return rows
