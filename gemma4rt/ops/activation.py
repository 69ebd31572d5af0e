"""gelu-tanh-and-mul. Native kernel in csrc/activation/; spec in reference.py."""
from __future__ import annotations

import torch

from gemma4rt.ops import reference as ref


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return ref.gelu_tanh_and_mul(x)
