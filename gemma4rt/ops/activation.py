"""gelu-tanh-and-mul. Native kernel in csrc/activation/; spec in reference.py."""
from __future__ import annotations

import torch

from gemma4rt.ops import _native
from gemma4rt.ops import reference as ref


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _native.use_native(x) and x.dtype in _native.FLOAT_TYPES and x.numel() > 0 and x.shape[-1] % 2 == 0:
        x2 = _native.rows2d(x)
        out = torch.empty(x2.shape[0], x2.shape[1] // 2, dtype=x.dtype, device=x.device)
        torch.ops.gemma4rt.gelu_tanh_and_mul(x2, out)
        return out.view(*x.shape[:-1], x.shape[-1] // 2)
    return ref.gelu_tanh_and_mul(x)
