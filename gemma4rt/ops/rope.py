"""Per-head q/k norm fused with RoPE (default and proportional), and the weightless v-norm.
Native kernels in csrc/rope/; specs in reference.py."""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.ops import _native
from gemma4rt.ops import reference as ref

rope_inv_freq = ref.rope_inv_freq
rope_cos_sin = ref.rope_cos_sin


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def head_norm_rope(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                   cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
    if (_native.use_native(x, weight, cos, sin) and x.dim() == 3 and x.dtype in _native.FLOAT_TYPES and
            x.shape[-1] % 2 == 0 and x.shape[-1] <= 512 and x.numel() > 0):
        xx = x if x.stride(-1) == 1 else x.contiguous()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        w = None if weight is None else weight.to(x.dtype).contiguous()
        torch.ops.gemma4rt.head_norm_rope(xx, w, float(eps), _f32(cos), _f32(sin), out)
        return out
    return ref.head_norm_rope(x, weight, eps, cos, sin)
