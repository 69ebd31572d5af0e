"""Skinny GEMM (decode projections, 1-8 rows) microbenchmarks: the native gemv against torch's
F.linear (cuBLAS) on Gemma 4 weight shapes, as fractions of the copy bandwidth (the weight read
dominates the bytes)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from bench.kernels.common import row, time_us

# (name, N, K): E2B MLP gate|up and down, E2B q|k|v, 26B-A4B dense gate|up, 31B MLP down, the 262144-row LM
# head of E2B
SHAPES = (("E2B gate_up", 12288, 1536), ("E2B down", 1536, 6144), ("E2B qkv", 2560, 1536),
          ("26B gate_up", 4224, 2816), ("31B down", 5376, 21504), ("E2B lm_head", 262144, 1536))


def run(ceil, quick=False):
    rows = []
    dt = torch.bfloat16
    for name, N, K in (SHAPES[:2] if quick else SHAPES):
        w = torch.randn(N, K, device="cuda", dtype=dt)
        for M in ((1, 8) if quick else (1, 2, 4, 8)):
            x = torch.randn(M, K, device="cuda", dtype=dt)
            out = torch.empty(M, N, device="cuda", dtype=dt)
            nbytes = (N * K + M * K + M * N) * 2
            t = time_us(lambda: torch.ops.gemma4rt.gemv(x, w, out))
            ref = time_us(lambda: F.linear(x, w))
            rows.append(row("gemm", "gemv", f"{name} M={M} N={N} K={K}", t, nbytes, 2 * M * N * K, ceil,
                            ref, ref_name="F.linear"))
            if M > 1:      # the experimental column-group kernel (GEMMA4RT_GEMV_COLS=1, read at each launch)
                os.environ["GEMMA4RT_GEMV_COLS"] = "1"
                try:
                    t = time_us(lambda: torch.ops.gemma4rt.gemv(x, w, out))
                finally:
                    del os.environ["GEMMA4RT_GEMV_COLS"]
                rows.append(row("gemm", "gemv cols", f"{name} M={M} N={N} K={K}", t, nbytes, 2 * M * N * K, ceil,
                                ref, ref_name="F.linear"))
    return rows
