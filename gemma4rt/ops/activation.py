"""gelu-tanh-and-mul (over [gate | up] rows, or separate gate and up). Native kernel in
csrc/activation/; spec in reference.py."""
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


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) · up for gate, up: [T, I] (row strides free), result in gate's dtype."""
    if (_native.use_native(gate, up) and gate.dtype in _native.FLOAT_TYPES and up.dtype == gate.dtype and
            gate.dim() == 2 and up.shape == gate.shape and gate.numel() > 0 and gate.stride(-1) == 1 and
            up.stride(-1) == 1):
        out = torch.empty_like(gate, memory_format=torch.contiguous_format)
        torch.ops.gemma4rt.gelu_tanh_mul(gate, up, out)
        return out
    return ref.gelu_tanh_mul(gate, up)
