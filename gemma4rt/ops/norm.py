"""Norm ops: RMSNorm (with / without weight), fused residual-add + RMSNorm, the post-FFN
"norm + residual add + layer scalar". Native kernels in csrc/norm/; specs in reference.py."""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.ops import reference as ref


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return ref.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.add_rms_norm(x, residual, weight, eps)


def norm_add_scale(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                   scale: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return ref.norm_add_scale(x, residual, weight, scale, eps)
