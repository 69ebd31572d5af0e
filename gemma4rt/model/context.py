"""ForwardContext: everything one forward step needs besides the weights (no global state)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class KVPool:
    """KV tensors of one attention geometry: k, v: [num_cache_layers, P, S, KVH, D].
    layer_slot maps a model layer index to its slot in the first dimension."""

    k: torch.Tensor
    v: torch.Tensor
    layer_slot: dict[int, int]
    page_size: int


@dataclass
class ForwardContext:
    """One step's batch, flattened over requests (T tokens, B requests).

    input_ids, positions: [T]; cu_seqlens_q: [B+1] int32 (request b owns rows cu[b]:cu[b+1], the
    last q_len_b positions of its sequence); seq_lens: [B] (KV length after this step);
    page_tables[pool]: [B, max_pages] int32; slot_mappings[pool]: [T] int64 (−1 = don't store);
    logits_indices: [N] rows whose logits are wanted (a suffix of each request's rows);
    block_ids: [T] image-block id per row (−1 none) for bidirectional vision blocks, or None;
    soft_embeds: [n_soft, d] multimodal soft tokens replacing the rows soft_rows: [n_soft]."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    page_tables: dict[str, torch.Tensor]
    slot_mappings: dict[str, torch.Tensor]
    kv: dict[str, KVPool]
    logits_indices: torch.Tensor
    block_ids: Optional[torch.Tensor] = None
    soft_embeds: Optional[torch.Tensor] = None
    soft_rows: Optional[torch.Tensor] = None
    # PLE token rows E_ple[ids] [T, L·P], gathered on the host when the table lives there
    ple_token_rows: Optional[torch.Tensor] = None
    allow_shared_layer_skip: bool = True
    # rows owned by no request (a mixed CUDA graph's padding) get a zero attention output
    zero_attn_out: bool = False
    # one-token requests beside prompt chunks: attention runs as two launches (ops.attention.mixed_step)
    mixed_attn: bool = False
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
