"""KV store and paged attention (prefill and decode). Native kernels in csrc/attention/; specs in
reference.py."""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.ops import reference as ref


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    ref.store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    page_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    sliding_window: Optional[int] = None, block_ids: Optional[torch.Tensor] = None,
                    scale: float = 1.0) -> torch.Tensor:
    return ref.paged_attention(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens,
                               sliding_window, block_ids, scale)
