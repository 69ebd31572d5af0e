"""Paged attention microbenchmarks: decode (batch 16–64, context 2k–8k, Gemma 4 GQA geometries) as a
fraction of copy bandwidth; prefill (4k tokens) as a fraction of the bf16 matmul rate. Torch SDPA on
dense (unpaged) K/V is the comparison point."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.kernels.common import row, time_us
from gemma4rt.ops import attention

S = 16
DECODE_GEOMS = [  # name, H, KVH, D, window
    ("31B-full", 32, 4, 512, None),
    ("31B-sliding", 32, 16, 256, 1024),
    ("26B-full", 16, 2, 512, None),
    ("E4B-sliding", 8, 2, 256, 512),
]


def _cache(B, ctx, KVH, D, dt):
    pages = -(-ctx // S)
    P = B * pages
    table = torch.randperm(P, device="cuda").to(torch.int32).view(B, pages)
    kc = torch.randn(P, S, KVH, D, device="cuda", dtype=dt)
    vc = torch.randn(P, S, KVH, D, device="cuda", dtype=dt)
    return kc, vc, table


def _sdpa(q, k, v, causal=False):
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0, enable_gqa=True)


def run(ceil, quick=False):
    rows = []
    dt = torch.bfloat16
    for name, H, KVH, D, W in DECODE_GEOMS:
        for B in (16, 64):
            for ctx in (2048, 8192):
                if quick and (B, ctx) != (64, 8192):
                    continue
                kc, vc, table = _cache(B, ctx, KVH, D, dt)
                q = torch.randn(B, H, D, device="cuda", dtype=dt) / D ** 0.5
                cu = torch.arange(B + 1, device="cuda", dtype=torch.int32)
                sl = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
                plan = attention.plan_attention(B, B, H, KVH, table.shape[1] * S, W, head_dim=D)
                out = torch.empty_like(q)
                ws_o, ws_lse = attention.attention_workspace(plan, B, H, D, q.device)
                fn = lambda: attention.paged_attention_planned(q, kc, vc, table, cu, sl, W, None, 1.0, plan,  # noqa
                                                               out, ws_o, ws_lse)
                t = time_us(fn)
                keys = min(ctx, W) if W else ctx
                nbytes = B * keys * KVH * D * 2 * 2 + 2 * q.numel() * 2
                flops = 4 * B * H * keys * D
                del kc, vc
                kd = torch.randn(B, KVH, keys, D, device="cuda", dtype=dt)
                vd = torch.randn(B, KVH, keys, D, device="cuda", dtype=dt)
                try:
                    tr = time_us(_sdpa(q.view(B, H, 1, D), kd, vd))
                except Exception:
                    tr = None
                rows.append(row("attention", f"decode {name}", f"B={B} ctx={ctx} splits={plan.num_splits}", t,
                                nbytes, flops, ceil, tr, "SDPA dense"))
                del kd, vd
                torch.cuda.empty_cache()
    for name, H, KVH, D, W in [("31B-full", 32, 4, 512, None), ("31B-sliding", 32, 16, 256, 1024),
                               ("26B-sliding", 16, 8, 256, 1024)]:
        T = 4096
        kc, vc, table = _cache(1, T, KVH, D, dt)
        q = torch.randn(T, H, D, device="cuda", dtype=dt) / D ** 0.5
        cu = torch.tensor([0, T], device="cuda", dtype=torch.int32)
        sl = torch.tensor([T], device="cuda", dtype=torch.int32)
        plan = attention.plan_attention(T, 1, H, KVH, table.shape[1] * S, W, head_dim=D)
        out = torch.empty_like(q)
        ws_o, ws_lse = attention.attention_workspace(plan, T, H, D, q.device)
        t = time_us(lambda: attention.paged_attention_planned(q, kc, vc, table, cu, sl, W, None, 1.0, plan, out,
                                                              ws_o, ws_lse), reps=7, inner=3)
        pairs = sum(min(i + 1, W) for i in range(T)) if W else T * (T + 1) // 2
        flops = 4 * H * D * pairs
        nbytes = 2 * q.numel() * 2 + 2 * kc.numel() * 2
        tr = None
        if not W:
            kd = torch.randn(1, KVH, T, D, device="cuda", dtype=dt)
            try:
                tr = time_us(_sdpa(q.transpose(0, 1)[None], kd, kd.clone(), causal=True), reps=5, inner=2)
            except Exception:
                tr = None
        rows.append(row("attention", f"prefill {name}", f"T={T} (1 request)", t, nbytes, flops, ceil, tr,
                        "SDPA causal dense"))
        del kc, vc
        torch.cuda.empty_cache()
    return rows
