"""Runs every kernel microbenchmark and prints one table (markdown) with each kernel's time, bytes
and FLOP rates as fractions of the card's measured copy bandwidth and bf16 matmul rate, beside the
PyTorch reference. Usage: python -m bench.kernels.run_all [--quick] [--only norm,attention,moe,sampling,gemm]"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from bench.kernels import attention, gemm, moe, norm, sampling  # noqa: E402
from bench.kernels.common import measure_ceilings, table  # noqa: E402
import gemma4rt.ops._native  # noqa: E402,F401  (loads the extension)

FAMILIES = {"norm": norm, "attention": attention, "moe": moe, "sampling": sampling, "gemm": gemm}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(FAMILIES))
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    ceil = measure_ceilings()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"card: {ceil['card']}, {stamp}; measured copy bandwidth {ceil['bw'] / 1e12:.2f} TB/s (read+write; "
            f"% BW is over this), read-only (torch.sum) {ceil['bw_read'] / 1e12:.2f} TB/s, bf16 matmul 8192³ {ceil['mm'] / 1e12:.0f} TFLOP/s; torch {torch.__version__}")
    print(head, flush=True)
    rows = []
    for name in args.only.split(","):
        t0 = time.time()
        try:
            rows += FAMILIES[name].run(ceil, quick=args.quick)
        except Exception:
            traceback.print_exc()
            print(f"[bench] {name} FAILED", flush=True)
        print(f"[bench] {name} done in {time.time() - t0:.1f}s", flush=True)
    md = head + "\n\n" + table(rows)
    if args.out:
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump({"ceil": ceil, "rows": rows}, f, indent=1)
    print(md)


if __name__ == "__main__":
    main()
