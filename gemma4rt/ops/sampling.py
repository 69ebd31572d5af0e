"""Token sampling over the full vocabulary: soft-cap, temperature, top-k / top-p / min-p, greedy,
and per-request seeds. Native kernel in csrc/sampling/ (one read of the logits; Philox noise keyed by
(seed, step)); the reference path is reference.softcap + reference.sample_from_logits with
reference.exponential_noise(seed, step) — same distribution, different noise stream."""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.ops import _native
from gemma4rt.ops import reference as ref

top_k_top_p_min_p_filter = ref.top_k_top_p_min_p_filter


def softcap(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return ref.softcap(logits, cap)


def sample_from_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor, min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Explicit-noise form (the reference; the noise tensor is [N, V], so no native fusion applies)."""
    return ref.sample_from_logits(logits, temperature, top_k, top_p, min_p, noise)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
           cap: Optional[float] = None) -> torch.Tensor:
    """logits [N, V] (raw, before the final soft-cap); temperature/top_p/min_p [N] float, top_k [N] int
    (≤ 0: off), seeds/steps [N] int. Greedy rows (temperature ≤ 0) take the argmax. Returns ids [N] int64.
    The same (seed, step) gives the same token."""
    N, V = logits.shape
    if (_native.use_native(logits, temperature, top_k, top_p, min_p, seeds, steps) and _native.has_op("sample") and
            logits.dtype in _native.FLOAT_TYPES and N > 0 and V <= 8 * 49152 and N <= 65535):
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        out = torch.empty(N, dtype=torch.int64, device=x.device)
        torch.ops.gemma4rt.sample(x, temperature.float().contiguous(), top_k.to(torch.int32).contiguous(),
                                  top_p.float().contiguous(), min_p.float().contiguous(),
                                  seeds.to(torch.int64).contiguous(), steps.to(torch.int64).contiguous(),
                                  float(cap or 0.0), out)
        return out
    capped = ref.softcap(logits, cap)
    noise = torch.stack([ref.exponential_noise(int(s), int(t), V, capped.device)
                         for s, t in zip(seeds.tolist(), steps.tolist())]) if N else capped.new_ones(0, V)
    return ref.sample_from_logits(capped, temperature.float(), top_k, top_p.float(), min_p.float(), noise)
