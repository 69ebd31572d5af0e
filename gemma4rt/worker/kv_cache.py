"""KV tensors of the paged hybrid cache: one pool per attention geometry.

Pool "sliding" holds every cache-owning sliding layer, pool "full" every cache-owning full layer
(KV-shared layers own none). A page holds `page_size` token slots for every layer of its pool:
k, v: [num_layers_in_pool, num_pages + 1, page_size, KVH, D] (the last page is scratch).
"""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.config import PoolSpec
from gemma4rt.model.context import KVPool
from gemma4rt.model.parallel import NO_TP, TP
from gemma4rt.model_config import FULL, SLIDING, TextConfig

POOL_OF_TYPE = {SLIDING: "sliding", FULL: "full"}


def pool_layout(text: TextConfig, tp: TP = NO_TP) -> dict[str, tuple[list[int], int, int]]:
    """pool name → (cache-owning layer indices, KV heads (this rank's), head dim)."""
    out = {}
    for lt, name in POOL_OF_TYPE.items():
        layers = text.cache_layers(lt)
        if layers:
            kvh, hd = text.geometry(lt)
            out[name] = (layers, tp.kv_heads(text.num_heads, kvh)[1], hd)
    return out


def bytes_per_token(text: TextConfig, dtype: torch.dtype, tp: TP = NO_TP) -> dict[str, int]:
    """K+V bytes one token occupies in each pool (on one rank)."""
    es = torch.empty((), dtype=dtype).element_size()
    return {name: 2 * len(layers) * kvh * hd * es for name, (layers, kvh, hd) in pool_layout(text, tp).items()}


def plan_pools(text: TextConfig, page_size: int, dtype: torch.dtype, max_total_tokens: int,
               max_running: int, budget_bytes: Optional[int] = None,
               max_chunk_tokens: int = 0, tp: TP = NO_TP) -> list[PoolSpec]:
    """Size the pools. The sliding pool needs a window per running request plus room for one
    prefill chunk (all of a chunk's tokens are stored before attention reads them); with a byte
    budget (GPU) the full pool gets what remains; `max_total_tokens` always bounds the full pool."""
    layout = pool_layout(text, tp)
    bpt = bytes_per_token(text, dtype, tp)
    W = text.sliding_window
    specs = []
    win_pages = (W + page_size - 1) // page_size + 2
    full_pages = max(4, (max_total_tokens + page_size - 1) // page_size)
    chunk_pages = (max_chunk_tokens + page_size - 1) // page_size + win_pages
    sliding_pages = max(4, chunk_pages, min(full_pages, max_running * win_pages))
    if budget_bytes is not None:
        # split the budget so that N requests of a typical context (avg_ctx) fit both pools
        b_s, b_f = bpt.get("sliding", 0), bpt.get("full", 0)
        avg_ctx = 2048
        per_req = win_pages * page_size * b_s + avg_ctx * b_f
        n = max(1, budget_bytes // max(1, per_req))
        sliding_pages = max(4, chunk_pages, min(n, max_running) * win_pages)
        rest = max(0, budget_bytes - sliding_pages * page_size * b_s)
        if b_f > 0:
            full_pages = max(4, min(full_pages, rest // (page_size * b_f)))
    for name in layout:
        n = sliding_pages if name == "sliding" else full_pages
        specs.append(PoolSpec(name=name, num_pages=int(n), page_size=page_size,
                              sliding_window=W if name == "sliding" else None,
                              bytes_per_page=page_size * bpt[name]))
    return specs


def allocate_pools(text: TextConfig, specs: list[PoolSpec], dtype: torch.dtype,
                   device: torch.device, tp: TP = NO_TP) -> dict[str, KVPool]:
    layout = pool_layout(text, tp)
    pools = {}
    for spec in specs:
        layers, kvh, hd = layout[spec.name]
        # one extra physical page past the scheduler's pages: a scratch page that padded rows of a
        # captured CUDA graph may point at (the scheduler never hands it out)
        shape = (len(layers), spec.num_pages + 1, spec.page_size, kvh, hd)
        k = torch.zeros(shape, dtype=dtype, device=device)
        v = torch.zeros(shape, dtype=dtype, device=device)
        pools[spec.name] = KVPool(k=k, v=v, layer_slot={l: i for i, l in enumerate(layers)},
                                  page_size=spec.page_size)
    return pools
