"""A model's batch-1 decode projections as one chain of dependent launches in a CUDA graph (each layer: q/k/v with
the q/k norms, RoPE and KV store, o_proj with its norms (a MoE layer's: the three that open its MoE block), gate/up
with gelu-and-mul, down_proj with its norms, and E2B/E4B's per-layer-input gate and projection; not the MoE
experts), as the decode step runs them through gemma4rt.ops.linear. It
times a layer with and without a launch setting in one process, replaying the two graphs in turns, so that
clock drift between processes does not enter the comparison (end-to-end figures of one model vary by ~5% from
one process to the next).

  python -m bench.kernels.gemv_chain [--models gemma-4-E2B-it,gemma-4-E4B-it] [--layers 12] [--rounds 15]
                                     [--env GEMMA4RT_GEMV_PRELOAD=0]

--env: the setting of the second graph: environment variables read at launch (so at capture), and the switches
of gemma4rt/ops/linear.py that are read at import (GEMMA4RT_GEMV, GEMMA4RT_FUSED_*), set for the capture."""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from gemma4rt.configs import lookup_builtin_config  # noqa: E402
from gemma4rt.model_config import parse_model_config  # noqa: E402

lin = importlib.import_module("gemma4rt.ops.linear")
# linear.py's switches read at import: (attribute, its value for the variable's setting)
SWITCHES = {"GEMMA4RT_GEMV": ("GEMV_ENABLED", lambda v: v != "0"),
            "GEMMA4RT_FUSED_PLE_GATE": ("FUSED_PLE_GATE", lambda v: v != "0"),
            "GEMMA4RT_FUSED_GEMV_NORM": ("FUSED_GEMV_NORM", lambda v: v != "0"),
            "GEMMA4RT_FUSED_QKV_ROPE": ("FUSED_QKV_ROPE", lambda v: v == "1"),
            "GEMMA4RT_FUSED_GEMV_NORM3": ("FUSED_GEMV_NORM3", lambda v: v == "1")}


def layer_weights(name: str, layers: int, dev) -> tuple[list[dict], int]:
    t = parse_model_config(lookup_builtin_config(name)).text
    d, P = t.hidden_size, t.hidden_size_per_layer_input
    out = []
    for spec in t.layers[:layers]:
        q = t.num_heads * spec.head_dim
        kv = (1 if spec.k_eq_v else 2) * spec.num_kv_heads * spec.head_dim
        I = spec.intermediate_size
        w = {"qkv": (q + kv, d), "o": (d, q), "gu": (2 * I, d), "down": (d, I)}
        if P:
            w.update(gate=(P, d), proj=(d, P))
        lw = {k: torch.randn(*s, device=dev, dtype=torch.bfloat16) / s[1] ** 0.5 for k, s in w.items()}
        norms = ("n1", "n2", "n3", "n4") + (("n5", "n6") if t.enable_moe_block else ())   # n5, n6: router's, experts'
        lw.update({k: torch.randn(d, device=dev, dtype=torch.bfloat16) for k in norms})
        D = spec.head_dim
        ones = torch.ones(D, device=dev, dtype=torch.bfloat16)
        lw.update(qn=ones, kn=ones,
                  cache=torch.zeros(2, 2, 16, spec.num_kv_heads, D, device=dev, dtype=torch.bfloat16),
                  cos=torch.ones(1, D // 2, device=dev), sin=torch.zeros(1, D // 2, device=dev),
                  slot=torch.tensor([3], device=dev), heads=t.num_heads, D=D)
        out.append(lw)
    return out, d


def chain(weights: list[dict], x: torch.Tensor, ple: torch.Tensor | None) -> torch.Tensor:
    h = x
    for lw in weights:
        q = lin.linear_qkv_norm_rope_store(h, lw["qkv"], lw["heads"], lw["D"], lw["qn"], lw["kn"], 1e-6, lw["cos"],
                                           lw["sin"], lw["cache"][0], lw["cache"][1], lw["slot"])
        a = q.view(1, -1)                                         # the attention output's stand-in
        if "n5" in lw:          # a MoE layer: o_proj and its block's three opening norms (the experts not run here)
            h, u, _, _ = lin.linear_norm_add_scale_norm3(a, lw["o"], h, lw["n1"], None, lw["n2"], lw["n5"], lw["n6"],
                                                         1e-6)
        else:
            h, u = lin.linear_norm_add_scale(a, lw["o"], h, lw["n1"], None, lw["n2"], 1e-6)
        act = lin.linear_gelu_mul(u, lw["gu"])
        if ple is None:
            h, _ = lin.linear_norm_add_scale(act, lw["down"], h, lw["n3"], None, None, 1e-6)
            continue
        h, _ = lin.linear_norm_add_scale(act, lw["down"], h, lw["n3"], None, None, 1e-6)
        g = lin.linear_gelu_aux(h, lw["gate"], ple)
        h, _ = lin.linear_norm_add_scale(g, lw["proj"], h, lw["n4"], None, None, 1e-6)
    return h


def capture(weights, x, ple, env: dict):
    saved = {k: os.environ.get(k) for k in env}
    saved_attr = {SWITCHES[k][0]: getattr(lin, SWITCHES[k][0]) for k in env if k in SWITCHES}
    os.environ.update(env)
    for k, v in env.items():
        if k in SWITCHES:
            setattr(lin, SWITCHES[k][0], SWITCHES[k][1](v))
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            chain(weights, x, ple)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = chain(weights, x, ple)
        return g, out
    finally:
        for name, v in saved_attr.items():
            setattr(lin, name, v)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def time_graph(g, reps: int = 20) -> float:
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gemma-4-E2B-it,gemma-4-E4B-it,gemma-4-26B-A4B-it,gemma-4-12B-it")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--env", default="GEMMA4RT_GEMV_PRELOAD=0")
    args = ap.parse_args()
    env_b = dict(kv.split("=", 1) for kv in args.env.split())
    dev = torch.device("cuda")
    print(f"card {torch.cuda.get_device_name()}; A: defaults, B: {args.env}; µs a layer (median of "
          f"{args.rounds} rounds of 20 replays, A and B in turns)")
    for name in args.models.split(","):
        weights, d = layer_weights(name, args.layers, dev)
        x = torch.randn(1, d, device=dev, dtype=torch.bfloat16)
        P = weights[0]["gate"].shape[0] if "gate" in weights[0] else 0
        ple = torch.randn(1, P, device=dev, dtype=torch.bfloat16) if P else None
        ga, oa = capture(weights, x, ple, {})
        gb, ob = capture(weights, x, ple, env_b)
        ga.replay(), gb.replay()
        torch.cuda.synchronize()
        same = torch.equal(oa, ob)
        ta, tb = [], []
        for _ in range(args.rounds):
            ta.append(time_graph(ga) / len(weights))
            tb.append(time_graph(gb) / len(weights))
        a, b = statistics.median(ta), statistics.median(tb)
        print(f"{name}: A {a:.2f} µs/layer, B {b:.2f} µs/layer, A/B {a / b:.3f}; outputs equal: {same}", flush=True)
        del ga, gb, weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
