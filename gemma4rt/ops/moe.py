"""MoE router and experts. Native kernels in csrc/moe/; specs in reference.py."""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.ops import reference as ref


def moe_route(router_logits: torch.Tensor, top_k: int,
              per_expert_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.moe_route(router_logits, top_k, per_expert_scale)


def moe_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return ref.moe_experts(x, gate_up, down, weights, ids)
