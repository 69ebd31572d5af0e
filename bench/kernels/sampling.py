"""Sampler microbenchmark over the 262144-token vocabulary (one read of the fp32 logits)."""
from __future__ import annotations

import torch

from bench.kernels.common import row, time_us
from gemma4rt.ops import reference as ref
from gemma4rt.ops import sampling

V = 262144


def run(ceil, quick=False):
    rows = []
    for N in (1, 64):
        logits = torch.randn(N, V, device="cuda") * 3
        for label, temp, k, p, mp in (("greedy", 0.0, 0, 1.0, 0.0), ("top-k50 top-p0.9", 0.8, 50, 0.9, 0.0),
                                      ("top-p0.95 min-p0.05", 1.0, 0, 0.95, 0.05)):
            t_ = torch.full((N,), temp, device="cuda")
            k_ = torch.full((N,), k, dtype=torch.int32, device="cuda")
            p_ = torch.full((N,), p, device="cuda")
            m_ = torch.full((N,), mp, device="cuda")
            seeds = torch.arange(N, device="cuda")
            steps = torch.zeros(N, dtype=torch.int64, device="cuda")
            out = torch.empty(N, dtype=torch.int64, device="cuda")
            t = time_us(lambda: torch.ops.gemma4rt.sample(logits, t_, k_, p_, m_, seeds, steps, 30.0, out))
            noise = torch.empty(N, V, device="cuda").exponential_()
            tr = time_us(lambda: ref.sample_from_logits(ref.softcap(logits, 30.0), t_, k_, p_, m_, noise), reps=5)
            rows.append(row("sampling", f"sample {label}", f"N={N} V={V}", t, N * V * 4, 0, ceil, tr,
                            "torch sort-based"))
    return rows
