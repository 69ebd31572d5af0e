"""Norm ops: RMSNorm (with / without weight), fused residual-add + RMSNorm, the post-FFN
"norm + residual add + layer scalar", that fused with the next norm (or three norms of it, as a MoE
block opens), and a MoE block's end (moe_block_end). Native kernels in csrc/norm/;
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


def norm_add_scale_norm3(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                         scale: Optional[torch.Tensor], weight2: torch.Tensor, weight3: torch.Tensor,
                         weight4: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """(h, rms_norm(h, weight2), rms_norm(h, weight3), rms_norm(h, weight4)) with h = norm_add_scale(x,
    residual, weight, scale): a MoE block opens with three norms of one residual stream (the shared
    MLP's, the router's, the experts'), one kernel."""
    if (_native.use_native(x, residual, weight, scale, weight2, weight3, weight4) and
            x.dtype in _native.FLOAT_TYPES and residual.dtype == x.dtype and x.numel() > 0):
        x2, r2 = _native.rows2d(x), _native.rows2d(residual)
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        normed = torch.empty((3,) + tuple(x2.shape), dtype=x.dtype, device=x.device)
        torch.ops.gemma4rt.norm_add_scale_norm3(x2, r2, _w(weight, x), _scale(scale), _w(weight2, x), _w(weight3, x),
                                                _w(weight4, x), float(eps), out, normed[0], normed[1], normed[2])
        return (out.view(x.shape),) + tuple(n.view(x.shape) for n in normed)
    h = ref.norm_add_scale(x, residual, weight, scale, eps)
    return (h,) + tuple(ref.rms_norm(h, w, eps) for w in (weight2, weight3, weight4))


def moe_block_end(m: torch.Tensor, e: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  w3: torch.Tensor, scale: Optional[torch.Tensor], w4: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h, w4)) with h = (x + rms_norm(rms_norm(m, w1) + rms_norm(e, w2), w3)) · scale (see
    reference.moe_block_end): what five launches did at a MoE block's end, one kernel."""
    if (_native.use_native(m, e, x, w1, w2, w3, scale, w4) and x.dtype in _native.FLOAT_TYPES and
            m.dtype == x.dtype and e.dtype == x.dtype and x.numel() > 0):
        m2, e2, x2 = _native.rows2d(m), _native.rows2d(e), _native.rows2d(x)
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        normed = torch.empty_like(out)
        torch.ops.gemma4rt.moe_block_end(m2, e2, x2, _w(w1, x), _w(w2, x), _w(w3, x), _scale(scale), _w(w4, x),
                                         float(eps), out, normed)
        return out.view(x.shape), normed.view(x.shape)
    return ref.moe_block_end(m, e, x, w1, w2, w3, scale, w4, eps)
