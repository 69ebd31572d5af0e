"""Norm / RoPE / activation microbenchmarks (memory-bound: fraction of copy bandwidth)."""
from __future__ import annotations

import torch

from bench.kernels.common import row, time_us
from gemma4rt.ops import reference as ref


def run(ceil, quick=False):
    rows = []
    dt = torch.bfloat16
    for d in (2816, 5376):
        for T in ((1, 4096) if quick else (1, 16, 256, 4096)):
            x = torch.randn(T, d, device="cuda", dtype=dt)
            r = torch.randn(T, d, device="cuda", dtype=dt)
            w = torch.randn(d, device="cuda", dtype=dt)
            sc = torch.tensor([0.5], device="cuda")
            o1, o2 = torch.empty_like(x), torch.empty_like(x)
            e = x.element_size() * T * d
            g = f"T={T} d={d}"
            t = time_us(lambda: torch.ops.gemma4rt.rms_norm(x, w, 1e-6, o1))
            rows.append(row("norm", "rms_norm", g, t, 2 * e, 0, ceil, time_us(lambda: ref.rms_norm(x, w, 1e-6))))
            t = time_us(lambda: torch.ops.gemma4rt.add_rms_norm(x, r, w, 1e-6, o1, o2))
            rows.append(row("norm", "add_rms_norm", g, t, 4 * e, 0, ceil,
                            time_us(lambda: ref.add_rms_norm(x, r, w, 1e-6))))
            t = time_us(lambda: torch.ops.gemma4rt.norm_add_scale(x, r, w, sc, 1e-6, o1))
            rows.append(row("norm", "norm_add_scale", g, t, 3 * e, 0, ceil,
                            time_us(lambda: ref.norm_add_scale(x, r, w, sc, 1e-6))))
            t = time_us(lambda: torch.ops.gemma4rt.norm_add_scale_norm(x, r, w, sc, w, 1e-6, o1, o2))
            rows.append(row("norm", "norm_add_scale_norm", g, t, 4 * e, 0, ceil,
                            time_us(lambda: ref.rms_norm(ref.norm_add_scale(x, r, w, sc, 1e-6), w, 1e-6))))
    for T, H, D in ((4096, 32, 256), (4096, 4, 512)):
        q = torch.randn(T, H, D, device="cuda", dtype=dt)
        w = torch.randn(D, device="cuda", dtype=dt)
        cos, sin = torch.rand(T, D // 2, device="cuda"), torch.rand(T, D // 2, device="cuda")
        o = torch.empty_like(q)
        t = time_us(lambda: torch.ops.gemma4rt.head_norm_rope(q, w, 1e-6, cos, sin, o))
        rows.append(row("rope", "head_norm_rope", f"T={T} H={H} D={D}", t, 2 * q.numel() * 2 + 2 * cos.numel() * 4, 0,
                        ceil, time_us(lambda: ref.head_norm_rope(q, w, 1e-6, cos, sin))))
    for T, I in ((4096, 2112), (64, 21504)):
        x = torch.randn(T, 2 * I, device="cuda", dtype=dt)
        o = torch.empty(T, I, device="cuda", dtype=dt)
        t = time_us(lambda: torch.ops.gemma4rt.gelu_tanh_and_mul(x, o))
        rows.append(row("act", "gelu_tanh_and_mul", f"T={T} I={I}", t, 3 * T * I * 2, 0, ceil,
                        time_us(lambda: ref.gelu_tanh_and_mul(x))))
    for T, P, L in ((1, 256, 35), (256, 256, 35)):       # the per-layer-input gate of E2B: one layer's slice
        g = torch.randn(T, P, device="cuda", dtype=dt)
        ple = torch.randn(T, L, P, device="cuda", dtype=dt)[:, 3]
        o = torch.empty(T, P, device="cuda", dtype=dt)
        t = time_us(lambda: torch.ops.gemma4rt.gelu_tanh_mul(g, ple, o))
        rows.append(row("act", "gelu_tanh_mul", f"T={T} P={P}", t, 3 * T * P * 2, 0, ceil,
                        time_us(lambda: ref.gelu_tanh_mul(g, ple))))
    return rows
