"""MoE microbenchmarks at the 26B-A4B geometry (128 experts, top-8, d 2816, I 704): router, and the
experts (alignment + grouped GEMMs + combine) at 1, 4, 8, 64 tokens (memory-bound: only the active
experts' weights count; at 1 and 4 also the experimental entry mode) and 4096 tokens (compute-bound)."""
from __future__ import annotations

import torch

from bench.kernels.common import row, time_us
from gemma4rt.ops import moe
from gemma4rt.ops import reference as ref

E, K, D, I = 128, 8, 2816, 704


def run(ceil, quick=False):
    rows = []
    dt = torch.bfloat16
    gu = (torch.randn(E, 2 * I, D, device="cuda") / D ** 0.5).to(dt)
    dn = (torch.randn(E, D, I, device="cuda") / I ** 0.5).to(dt)
    scale = torch.rand(E, device="cuda") + 0.5
    for T in (1, 4, 8, 64, 4096):
        x = torch.randn(T, D, device="cuda", dtype=dt)
        logits = torch.randn(T, E, device="cuda", dtype=dt)
        w, ids = moe.moe_route(logits, K, scale)
        n_act = int(torch.unique(ids).numel())
        wbytes = n_act * 3 * I * D * 2
        nbytes = wbytes + 2 * T * D * 2
        flops = T * K * 3 * I * D * 2
        saved, moe.ENTRY_GEMV = moe.ENTRY_GEMV, False     # the tile kernels (above ENTRY_GEMV_MAX: always)
        try:
            t = time_us(lambda: moe.moe_experts(x, gu, dn, w, ids))
        finally:
            moe.ENTRY_GEMV = saved
        tr = time_us(lambda: ref.moe_experts(x, gu, dn, w, ids), reps=5, graph=False) if T <= 64 else None
        rows.append(row("moe", "moe_experts", f"T={T} active={n_act}", t, nbytes, flops, ceil, tr, "ref loop"))
        if T * K <= moe.ENTRY_GEMV_MAX:      # the entry mode (the default here), same inputs
            saved, moe.ENTRY_GEMV = moe.ENTRY_GEMV, True
            try:
                te = time_us(lambda: moe.moe_experts(x, gu, dn, w, ids))
            finally:
                moe.ENTRY_GEMV = saved
            rows.append(row("moe", "moe_experts entry", f"T={T} active={n_act}", te, nbytes, flops, ceil, t,
                            "tile kernels"))
        wr, idr = torch.empty(T, K, device="cuda"), torch.empty(T, K, dtype=torch.int32, device="cuda")
        t = time_us(lambda: torch.ops.gemma4rt.moe_route(logits, K, scale, wr, idr))
        rows.append(row("moe", "moe_route", f"T={T} E={E}", t, T * E * 2 + T * K * 8, 0, ceil,
                        time_us(lambda: ref.moe_route(logits, K, scale)), "torch softmax+topk"))
    return rows
