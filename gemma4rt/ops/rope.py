"""Per-head q/k norm fused with RoPE (default and proportional), and the weightless v-norm.
Native kernels in csrc/rope/; specs in reference.py."""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.ops import _native
from gemma4rt.ops import reference as ref
from gemma4rt.ops.attention import store_kv

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


def qkv_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: Optional[torch.Tensor],
                        k_weight: Optional[torch.Tensor], eps: float, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """A layer's new q, k, v: returns head_norm_rope(q, q_weight), and stores head_norm_rope(k, k_weight)
    and the weightless norm of v into the caches at slot_mapping — one native kernel on a GPU, the three
    norms and store_kv otherwise (the specification)."""
    if (cos is not None and sin is not None and
            _native.use_native(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, slot_mapping) and
            q.dim() == 3 and q.dtype in _native.FLOAT_TYPES and k.dtype == v.dtype == k_cache.dtype ==
            v_cache.dtype == q.dtype and q.shape[-1] % 2 == 0 and q.shape[-1] <= 512 and
            k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.shape[0] > 0):
        qq, kk, vv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        w = [None if x is None else x.to(q.dtype).contiguous() for x in (q_weight, k_weight)]
        torch.ops.gemma4rt.qkv_norm_rope_store(qq, kk, vv, w[0], w[1], float(eps), _f32(cos), _f32(sin), k_cache,
                                               v_cache, slot_mapping.to(torch.int64).contiguous(), out)
        return out
    qn = head_norm_rope(q, q_weight, eps, cos, sin)
    store_kv(head_norm_rope(k, k_weight, eps, cos, sin), head_norm_rope(v, None, eps, None, None), k_cache, v_cache,
             slot_mapping)
    return qn
