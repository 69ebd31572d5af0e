"""Multimodal soft tokens for one step: encode images/audio once, scatter their rows into the step.

`attach_mm_inputs(model, ctx, items, mm_cache)` is called by ModelRunner._build_context when a scheduled
request carries MultimodalItems. For each request it finds the items whose placeholder range
[offset, offset + num_tokens) overlaps the step's rows [start, start + num_tokens), encodes each such item
once (encoder outputs cached by content hash, LRU-bounded, so a chunk boundary or a repeated image never
re-encodes), and sets on the ForwardContext:

  soft_rows   [n]    row indices into this step's flattened tokens
  soft_embeds [n, d] the soft tokens for those rows (model dtype)
  block_ids   [T]    only for `use_bidirectional_attention == "vision"` models with image/video rows in the
                     step: −1 outside image/video blocks, a distinct id per item inside (bidirectional
                     attention on sliding layers during prefill; the scheduler never splits such a block).

The array names an item carries are documented in gemma4rt/frontend/mm_preprocess.py. The cache lives on
the model's device and is bounded by GEMMA4RT_MM_CACHE_ITEMS (default 256) and GEMMA4RT_MM_CACHE_MB (256).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from gemma4rt.protocol import MultimodalItem

_MAX_ENTRIES = int(os.environ.get("GEMMA4RT_MM_CACHE_ITEMS", "256"))
_MAX_BYTES = int(float(os.environ.get("GEMMA4RT_MM_CACHE_MB", "256")) * 2**20)
_BYTES_KEY = "__bytes__"


def decode_array(entry: tuple[str, list[int], bytes]) -> np.ndarray:
    """(dtype, shape, raw bytes) → numpy array (a copy, writable)."""
    dtype, shape, raw = entry
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()


def _tensor(item: MultimodalItem, name: str, device: torch.device) -> torch.Tensor:
    if name not in item.arrays:
        raise ValueError(f"{item.modality} item {item.content_hash[:12]} lacks array {name!r}")
    return torch.from_numpy(decode_array(item.arrays[name])).to(device)


def encode_item(model, item: MultimodalItem, device: torch.device) -> torch.Tensor:
    """Soft tokens [num_tokens, d] of one item."""
    if item.modality in ("image", "video"):
        out = model.encode_image(_tensor(item, "pixel_values", device), _tensor(item, "image_position_ids", device))
    elif item.modality == "audio":
        mask = _tensor(item, "input_features_mask", device) if "input_features_mask" in item.arrays else None
        out = model.encode_audio(_tensor(item, "input_features", device), mask)
    else:
        raise ValueError(f"unknown modality {item.modality!r}")
    if out.shape[0] != item.num_tokens:
        raise ValueError(f"{item.modality} item {item.content_hash[:12]} encodes to {out.shape[0]} soft tokens "
                         f"but the prompt holds {item.num_tokens} placeholders")
    return out


def cached_encode(model, item: MultimodalItem, mm_cache: dict, device: torch.device) -> torch.Tensor:
    """encode_item with an LRU cache keyed by (modality, content_hash, num_tokens)."""
    key = (item.modality, item.content_hash, item.num_tokens)
    hit = mm_cache.pop(key, None)
    if hit is not None:
        mm_cache[key] = hit               # most recently used goes last
        return hit
    out = encode_item(model, item, device)
    mm_cache[key] = out
    size = mm_cache.get(_BYTES_KEY, 0) + out.numel() * out.element_size()
    while True:
        keys = [k for k in mm_cache if k != _BYTES_KEY]
        if len(keys) <= 1 or (len(keys) <= _MAX_ENTRIES and size <= _MAX_BYTES):
            break
        old = mm_cache.pop(keys[0])
        size -= old.numel() * old.element_size()
    mm_cache[_BYTES_KEY] = size
    return out


def attach_mm_inputs(model, ctx, items: list[tuple[Any, Any]], mm_cache: dict) -> None:
    """items: [(ScheduledRequest, seq with .mm_items)] in step order (rows follow ctx.cu_seqlens_q)."""
    cu = ctx.cu_seqlens_q.tolist()
    device = ctx.input_ids.device
    bidir = getattr(getattr(model, "config", None), "text", None)
    bidir = bidir is not None and bidir.use_bidirectional_attention == "vision"
    rows: list[torch.Tensor] = []
    embeds: list[torch.Tensor] = []
    block = None
    next_block = 0
    for b, (sr, seq) in enumerate(items):
        base = cu[b]
        s0, s1 = sr.start, sr.start + sr.num_tokens
        for item in seq.mm_items:
            a, e = item.offset, item.offset + item.num_tokens
            lo, hi = max(a, s0), min(e, s1)
            if lo >= hi:
                continue
            emb = cached_encode(model, item, mm_cache, device)
            r = torch.arange(base + lo - s0, base + hi - s0, device=device)
            rows.append(r)
            embeds.append(emb[lo - a:hi - a])
            if bidir and item.modality in ("image", "video"):
                if block is None:
                    block = torch.full((ctx.num_tokens,), -1, dtype=torch.int32, device=device)
                block[r] = next_block
                next_block += 1
    if rows:
        ctx.soft_rows = torch.cat(rows)
        ctx.soft_embeds = torch.cat(embeds, 0)
    if block is not None:
        ctx.block_ids = block


__all__ = ["attach_mm_inputs", "encode_item", "cached_encode", "decode_array"]
