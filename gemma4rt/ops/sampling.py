"""Logits soft-cap and token sampling. Native kernels in csrc/sampling/; specs in reference.py."""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.ops import reference as ref


def softcap(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return ref.softcap(logits, cap)


def sample_from_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor, min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return ref.sample_from_logits(logits, temperature, top_k, top_p, min_p, noise)
