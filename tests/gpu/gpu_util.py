"""Shared helpers for tests/gpu (imported after the module-level skip checks)."""
from __future__ import annotations

import pytest
import torch


def require_native():
    if not torch.cuda.is_available():
        pytest.skip("not run: no CUDA device", allow_module_level=True)
    from gemma4rt.ops import _native
    if not _native.NATIVE_AVAILABLE:
        pytest.skip("not run: gemma4rt._C extension not built (pip install --no-build-isolation -e . on a GPU machine)",
                    allow_module_level=True)


def require_op(name):
    """Module-level: report the module as not run when the build lacks this op (a ROCm build leaves
    out gemma4rt.ops._native.CUDA_ONLY_OPS)."""
    from gemma4rt.ops import _native
    if not _native.has_op(name):
        pytest.skip(f"not run: this build of gemma4rt._C has no {name} (ROCm builds leave it out)",
                    allow_module_level=True)


DEV = "cuda"
HALF = [torch.bfloat16, torch.float16]


def poison(*shape, dtype, device=DEV):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close(out, ref, dtype, name="", rel=None):
    """Elementwise tolerance by dtype plus a relative-norm bound; NaN never passes."""
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    o, r = out.double(), ref.double()
    assert torch.isfinite(o).all(), f"{name}: non-finite output (unwritten or broken)"
    tol = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}[dtype]
    err = (o - r).abs()
    bound = tol[0] + tol[1] * r.abs()
    bad = (err > bound).sum().item()
    # a handful of 1-ulp rounding flips are allowed, not systematic error
    assert bad <= max(2, o.numel() // 1000), f"{name}: {bad} elements out of tolerance, max err {err.max().item()}"
    rn = ((o - r).norm() / r.norm().clamp_min(1e-12)).item()
    assert rn < (rel or {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]), f"{name}: rel err {rn}"


def graph_replay(fn, inputs_static, refill):
    """Capture fn() (which reads inputs_static and writes its outputs), refill inputs with fresh
    data, replay, and return fn's captured outputs."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up (lazy init outside the capture)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = fn()
    refill()
    g.replay()
    torch.cuda.synchronize()
    return outs
