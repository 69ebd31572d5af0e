"""Shared microbenchmark helpers: graph-replayed CUDA-event timing (median), the card's measured
ceilings (device-to-device copy bandwidth, read-only bandwidth of a full reduction, bf16 matmul rate), and
the result table."""
from __future__ import annotations

import statistics

import torch


def time_us(fn, reps: int = 15, inner: int = 10, graph: bool = True) -> float:
    """Median time of one fn() in µs. With graph=True, `inner` calls are captured in a CUDA graph and
    replayed (no launch gaps); otherwise each call is bracketed by events."""
    fn()
    torch.cuda.synchronize()
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
            g.replay()
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) * 1e3 / inner)
            return statistics.median(ts)
        except Exception:  # an op that syncs (a reference) cannot be captured
            torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def measure_ceilings() -> dict:
    n = 1 << 29  # 1 GiB of bytes
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    t = time_us(lambda: dst.copy_(src), reps=10, inner=3)
    bw = 2 * n / (t * 1e-6)  # bytes read + written
    # read-only rate (a decode kernel mostly reads): a full reduction of the same GiB
    t = time_us(lambda: torch.sum(src), reps=10, inner=3)
    bw_read = n / (t * 1e-6)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = time_us(lambda: a @ b, reps=10, inner=3)
    flops = 2 * m ** 3 / (t * 1e-6)
    del a, b
    torch.cuda.empty_cache()
    return {"bw": bw, "bw_read": bw_read, "mm": flops, "card": torch.cuda.get_device_name()}


def row(family, name, geom, t_us, nbytes, flops, ceil, ref_us=None, ref_name="torch ref"):
    bw = nbytes / (t_us * 1e-6)
    fl = flops / (t_us * 1e-6) if flops else 0.0
    return {"family": family, "op": name, "geometry": geom, "us": t_us, "GBps": bw / 1e9,
            "bw_frac": bw / ceil["bw"], "TFLOPs": fl / 1e12, "mm_frac": fl / ceil["mm"],
            "ref_us": ref_us, "ref_name": ref_name}


def table(rows) -> str:
    head = "| op | geometry | µs | GB/s | % BW | TFLOP/s | % MM | reference µs (which) | speed-up |\n" \
           "|---|---|---|---|---|---|---|---|---|\n"
    out = []
    for r in rows:
        ref = f"{r['ref_us']:.1f} ({r['ref_name']})" if r["ref_us"] else "-"
        sp = f"{r['ref_us'] / r['us']:.1f}x" if r["ref_us"] else "-"
        out.append(f"| {r['op']} | {r['geometry']} | {r['us']:.1f} | {r['GBps']:.0f} | {100 * r['bw_frac']:.0f}% | "
                   f"{r['TFLOPs']:.1f} | {100 * r['mm_frac']:.0f}% | {ref} | {sp} |")
    return head + "\n".join(out) + "\n"
