"""Linear layers (x · Wᵀ, W in the checkpoint's [out, in] layout). With GEMMA4RT_GEMV=1, 1–8 rows of
bf16/fp16 go through the native skinny GEMM in csrc/gemm/gemv.cu (experimental: off by default until
its GPU tests and a side-by-side benchmark have run); everything else is torch's F.linear."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gemma4rt.ops import _native

GEMV_MAX_ROWS = 8
GEMV_ENABLED = os.environ.get("GEMMA4RT_GEMV", "0") == "1"


def gemv_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dim() == 2 and w.dim() == 2 and 1 <= x.shape[0] <= GEMV_MAX_ROWS and _native.use_native(x, w) and
            x.dtype in _native.HALF_TYPES and w.dtype == x.dtype and x.shape[1] == w.shape[1] and
            x.shape[1] % 8 == 0 and x.stride(-1) == 1 and w.stride(-1) == 1 and x.stride(0) % 8 == 0 and
            w.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The native skinny GEMM, unconditionally (callers check gemv_ok)."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    torch.ops.gemma4rt.gemv(x, w, out)
    return out


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if GEMV_ENABLED and gemv_ok(x, w):
        return gemv(x, w)
    return F.linear(x, w)
