"""Norm ops: RMSNorm (with / without weight), fused residual-add + RMSNorm, the post-FFN
"norm + residual add + layer scalar", and that fused with the next norm. Native kernels in csrc/norm/;
specs in reference.py."""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.ops import _native
from gemma4rt.ops import reference as ref


def _w(weight: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    return None if weight is None else weight.to(x.dtype).contiguous()


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    if _native.use_native(x, weight) and x.dtype in _native.FLOAT_TYPES and x.numel() > 0:
        x2 = _native.rows2d(x)
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        torch.ops.gemma4rt.rms_norm(x2, _w(weight, x), float(eps), out)
        return out.view(x.shape)
    return ref.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if (_native.use_native(x, residual, weight) and x.dtype in _native.FLOAT_TYPES and
            residual.dtype == x.dtype and x.numel() > 0):
        x2, r2 = _native.rows2d(x), _native.rows2d(residual)
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        r_out = torch.empty_like(out)
        torch.ops.gemma4rt.add_rms_norm(x2, r2, _w(weight, x), float(eps), out, r_out)
        return out.view(x.shape), r_out.view(x.shape)
    return ref.add_rms_norm(x, residual, weight, eps)


def norm_add_scale(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                   scale: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    if (_native.use_native(x, residual, weight, scale) and x.dtype in _native.FLOAT_TYPES and
            residual.dtype == x.dtype and x.numel() > 0):
        x2, r2 = _native.rows2d(x), _native.rows2d(residual)
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        torch.ops.gemma4rt.norm_add_scale(x2, r2, _w(weight, x), _scale(scale), float(eps), out)
        return out.view(x.shape)
    return ref.norm_add_scale(x, residual, weight, scale, eps)


def _scale(scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if scale is None:
        return None
    s = scale.reshape(-1)[:1]
    return s if s.dtype == torch.float32 and s.is_contiguous() else s.float().contiguous()


def norm_add_scale_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                        scale: Optional[torch.Tensor], weight2: Optional[torch.Tensor],
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h, weight2)) with h = norm_add_scale(x, residual, weight, scale): the end of one
    block and the norm that opens the next, in one kernel."""
    if (_native.use_native(x, residual, weight, scale, weight2) and x.dtype in _native.FLOAT_TYPES and
            residual.dtype == x.dtype and x.numel() > 0):
        x2, r2 = _native.rows2d(x), _native.rows2d(residual)
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        normed = torch.empty_like(out)
        torch.ops.gemma4rt.norm_add_scale_norm(x2, r2, _w(weight, x), _scale(scale), _w(weight2, x), float(eps),
                                               out, normed)
        return out.view(x.shape), normed.view(x.shape)
    h = ref.norm_add_scale(x, residual, weight, scale, eps)
    return h, ref.rms_norm(h, weight2, eps)
