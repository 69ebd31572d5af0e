"""Loads the native extension gemma4rt._C when it was built, and says whether an op may use it."""
from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the build
    if os.environ.get("GEMMA4RT_DISABLE_NATIVE", "0") == "1":
        raise ImportError("disabled by GEMMA4RT_DISABLE_NATIVE=1")
    from gemma4rt import _C  # noqa: F401  (registers torch.ops.gemma4rt.*)
    NATIVE_AVAILABLE = True
except ImportError:
    NATIVE_AVAILABLE = False


def use_native(*tensors: torch.Tensor) -> bool:
    """True when the extension is loaded and every tensor lives on a CUDA/ROCm device."""
    return NATIVE_AVAILABLE and all(t.is_cuda for t in tensors if t is not None)
