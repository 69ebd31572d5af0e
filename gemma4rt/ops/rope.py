"""Per-head q/k norm fused with RoPE (default and proportional), and the weightless v-norm.
Native kernels in csrc/rope/; specs in reference.py."""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.ops import reference as ref

rope_inv_freq = ref.rope_inv_freq
rope_cos_sin = ref.rope_cos_sin


def head_norm_rope(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                   cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
    return ref.head_norm_rope(x, weight, eps, cos, sin)
