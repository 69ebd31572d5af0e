"""Decode-attention sweep at serving geometries: batch 100 (and 1) at a mid-serving context, for the
plan the engine would pick and for forced split sizes. Each call walks several layers' caches in turn
(like a model step), so small per-layer caches do not stay in L2 between calls.

    python -m bench.kernels.decode_sweep [--ctx 1100] [--batches 100,1] [--layouts nhd,hnd] [--out DIR]

Kernel variants (`--variants`): "ROWS[:TILE]", ROWS = 16 (the 16-row decode kernel) or 8 (the 8-row kernel,
keys on the MMA's M side), TILE = [b]KBxNS: KB keys per stage, NS stages, "b" for bulk copies
(GEMMA4RT_DECODE16_TILE / GEMMA4RT_DECODE8_TILE), each timed for the engine's plan and the forced split sizes. `--tables seq` also
times page tables in order (against random order), `--probe` the 8-row kernels' loads without compute,
`--contexts spread` requests of uneven contexts (uniform on [1, 2 ctx - 1], as in serving). Rows carry $SWEEP_TAG, to tell builds apart in the jsonl.

H200, 2026-11-29, ~1.1k context, batch 100 (us per layer): keys per stage x stages 32x2 / 32x3 / 16x3 /
16x4 / 16x2 for the 26B-A4B sliding layer in 256-key splits 354 / 466 / 347 / 415 / 356, full layer 274 /
281 / 228 / 339 / 232; E2B sliding (engine plan) 45 / 50 / 35 / 53 / 36. The kernel now runs 16x3 for
decode (32x2 where a CTA owns one 32-key split)."""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench.kernels.common import measure_ceilings, time_us
from gemma4rt.ops import attention

S = 16
GEOMS = [  # name, H, KVH, D, window
    ("26B-sliding", 16, 8, 256, 1024),
    ("26B-full", 16, 2, 512, None),
    ("E2B-sliding", 8, 1, 256, 512),
    ("E2B-full", 8, 1, 512, None),
    ("E4B-sliding", 8, 2, 256, 512),
    ("31B-sliding", 32, 16, 256, 1024),
    ("31B-full", 32, 4, 512, None),
    ("12B-full", 16, 1, 512, None),     # 16 query heads per KV head: the 16-row kernel only
]
# the 12B's sliding layers have the 26B-A4B's geometry (16 heads, 8 KV heads, 256, window 1024)


def _kv(P: int, KVH: int, D: int, layout: str, dt) -> torch.Tensor:
    """A [P, S, KVH, D] cache view. "nhd": the engine's layout (a page's slots, each with every KV head);
    "hnd": head-major pages ([P, KVH, S, D] in memory, so one head's slots of a page are contiguous),
    seen through strides, which the kernel takes as given."""
    if layout == "hnd":
        return torch.randn(P, KVH, S, D, device="cuda", dtype=dt).transpose(1, 2)
    return torch.randn(P, S, KVH, D, device="cuda", dtype=dt)


def sweep(ctx: int, batches, ceil, layouts=("nhd",), variants=("16", "8:16x2"), tables=("random",),
          probe=False, contexts=("uniform",)) -> list[dict]:
    dt = torch.bfloat16
    rows = []
    for (name, H, KVH, D, W), layout, order, cdist in [(g, lay, o, c) for g in GEOMS for lay in layouts
                                                        for o in tables for c in contexts]:
        for B in batches:
            # "uniform": every request at ctx tokens; "spread": uniform on [1, 2·ctx - 1] (seeded), as in serving
            gen = torch.Generator().manual_seed(B)
            lens = ([ctx] * B if cdist == "uniform" or B == 1 else
                    torch.randint(1, 2 * ctx, (B,), generator=gen).tolist())
            per_layer = sum(min(c, W) if W else c for c in lens) * KVH * D * 2 * 2
            layers = max(1, min(8, (512 << 20) // max(per_layer, 1)))
            pages = -(-max(lens) // S)
            caches = []
            for _ in range(layers):
                table = (torch.randperm(B * pages, device="cuda") if order == "random" else
                         torch.arange(B * pages, device="cuda")).to(torch.int32).view(B, pages)
                caches.append((_kv(B * pages, KVH, D, layout, dt), _kv(B * pages, KVH, D, layout, dt), table))
            q = torch.randn(B, H, D, device="cuda", dtype=dt) / D ** 0.5
            cu = torch.arange(B + 1, device="cuda", dtype=torch.int32)
            sl = torch.tensor(lens, device="cuda", dtype=torch.int32)
            span = min(pages * S, W + B) if W else pages * S
            plans = {}
            for var in variants:
                nrow = var.partition(":")[0]
                if nrow == "8" and H // KVH > 8:
                    continue
                base = attention.plan_attention(B, B, H, KVH, pages * S, W, head_dim=D, decode_rows=int(nrow))
                plans[(var, "plan")] = base
                if B > 1:
                    for ss in (32, 64, 128, 256, 512):
                        if ss < span:
                            plans[(var, f"split{ss}")] = attention.AttentionPlan(-(-span // ss), ss, base.max_tiles,
                                                                                 base.warps_m)
                    plans[(var, "nosplit")] = attention.AttentionPlan(1, -(-span // 32) * 32, base.max_tiles,
                                                                       base.warps_m)
            if probe:      # the 8-row kernels' load path alone, at the engine's plan
                plans.update({(v, "probe"): pl for (v, lab), pl in list(plans.items())
                              if lab == "plan" and v.startswith("8")})
            for (var, label), plan in plans.items():
                nrow, _, tile = var.partition(":")
                if label == "probe":
                    os.environ["GEMMA4RT_ATTN_PROBE"] = "1"
                else:
                    os.environ.pop("GEMMA4RT_ATTN_PROBE", None)
                for n in ("8", "16"):
                    os.environ.pop(f"GEMMA4RT_DECODE{n}_TILE", None)
                if tile:
                    os.environ[f"GEMMA4RT_DECODE{nrow}_TILE"] = tile
                out = torch.empty_like(q)
                ws_o, ws_lse = attention.attention_workspace(plan, B, H, D, q.device)

                def fn(plan=plan, out=out, ws_o=ws_o, ws_lse=ws_lse, caches=caches):
                    for kc, vc, table in caches:
                        attention.paged_attention_planned(q, kc, vc, table, cu, sl, W, None, 1.0, plan, out,
                                                          ws_o, ws_lse)
                t = time_us(fn, reps=9, inner=4) / layers
                rows.append({"geom": name, "layout": layout, "pages": order, "contexts": cdist, "B": B, "ctx": ctx,
                             "kernel": var,
                             "label": label,
                             "splits": plan.num_splits,
                             "split_size": plan.split_size, "us": round(t, 2),
                             "GBps": round(per_layer / (t * 1e-6) / 1e9, 1),
                             "bw_frac": round(per_layer / (t * 1e-6) / ceil["bw"], 3),
                             "read_frac": round(per_layer / (t * 1e-6) / ceil["bw_read"], 3),
                             "tag": os.environ.get("SWEEP_TAG", "")})
                print(json.dumps(rows[-1]), flush=True)
            os.environ.pop("GEMMA4RT_ATTN_PROBE", None)
            del caches
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=1100)
    ap.add_argument("--batches", default="100,1")
    ap.add_argument("--layouts", default="nhd", help="nhd (the engine's KV layout), hnd (head-major pages), or both")
    ap.add_argument("--variants", default="16,16:b16x2,16:b16x3,8:b16x2,8:b16x3",
                    help='decode kernels: "ROWS[:TILE]", ROWS 8 or 16 (tile rows), TILE as in GEMMA4RT_DECODE8_TILE / '
                         'GEMMA4RT_DECODE16_TILE (default: the kernel\'s own)')
    ap.add_argument("--tables", default="random", help="random (pages in random order) and/or seq (in order)")
    ap.add_argument("--probe", action="store_true", help="also time the 8-row kernels' loads alone")
    ap.add_argument("--contexts", default="uniform",
                    help="uniform (every request at --ctx) and/or spread (uniform on [1, 2 ctx - 1], as in serving)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    a = ap.parse_args()
    ceil = measure_ceilings()
    print(json.dumps({"card": ceil["card"], "copy_GBps": round(ceil["bw"] / 1e9),
                      "read_GBps": round(ceil["bw_read"] / 1e9)}), flush=True)
    rows = sweep(a.ctx, [int(b) for b in a.batches.split(",")], ceil, tuple(a.layouts.split(",")),
                 tuple(a.variants.split(",")), tuple(a.tables.split(",")), a.probe, tuple(a.contexts.split(",")))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "decode_sweep.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "card": ceil["card"]}) + "\n")


if __name__ == "__main__":
    main()
