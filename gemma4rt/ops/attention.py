"""KV store and paged attention (prefill and decode). Native kernels in csrc/attention/; specs in
reference.py.

The native attention splits into a host-side plan (`plan_attention`: tile and split sizes from
host-known bounds only — token count, request count, page-table width — never from device values)
and a device-side run (`paged_attention_planned`) that a CUDA graph can capture."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from gemma4rt.ops import _native
from gemma4rt.ops import reference as ref

KEYS_PER_STAGE = 32     # the kernel's key tile; split sizes are multiples of it
DECODE_MAX_Q = 8        # a step of at most this many query rows per request runs decode tiles (8 or 16 rows)
# (one launch per step, decode and prompt rows alike: two launches per mixed step measured slower, RESULTS.md)
# A pure decode step (one token per request) of a layer with at most 8 query heads per KV head runs the 8-row
# decode kernel (keys on the MMA's M side) once it has DECODE8_MIN_CTAS (request x KV head) pairs;
# GEMMA4RT_DECODE8=0 keeps the 16-row tiles. H200 (bench/kernels/decode_sweep.py, us per layer, 8-row vs
# 16-row, both with bulk K/V copies): batch 100 26B-A4B sliding 241 vs 268, 31B full 266 vs 304, E4B sliding
# 42 vs 48; batch 1 (one 32-key split a CTA) E2B sliding 12.2 vs 10.8, 26B-A4B full 16.9 vs 15.8, 31B sliding
# (16 KV heads) 17.5 vs 22.5.
DECODE8 = os.environ.get("GEMMA4RT_DECODE8", "1") != "0"
DECODE8_MIN_CTAS = 16
DECODE8_SPLIT_KEYS = 2048
CTAS_PER_SM = 4         # split decode attention until about this many CTAs per SM
# Decode key ranges are also cut to about this many keys (at most MAX_FINE_SPLITS pieces) even when the
# (request x KV head) grid already fills the GPU: many short CTAs balance uneven contexts and leave no
# partial last wave. H200, batch 100, ~1.1k context (bench/kernels/decode_sweep.py): 26B-A4B sliding
# layer 387 us unsplit -> 347 us in 256-key splits; 31B sliding 722 -> 656 us.
DECODE_SPLIT_KEYS = 256
MAX_FINE_SPLITS = 16
NATIVE_HEAD_DIMS = (256, 512)
WORKSPACE_CAP_BYTES = 256 << 20    # split partials of one attention call


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    if (_native.use_native(k, v, k_cache, v_cache, slot_mapping) and k.dtype == k_cache.dtype == v.dtype ==
            v_cache.dtype and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1):
        kk = k if k.stride(-1) == 1 else k.contiguous()
        vv = v if v.stride(-1) == 1 else v.contiguous()
        torch.ops.gemma4rt.store_kv(kk, vv, k_cache, v_cache, slot_mapping.to(torch.int64).contiguous())
        return
    ref.store_kv(k, v, k_cache, v_cache, slot_mapping)


@dataclass(frozen=True)
class AttentionPlan:
    num_splits: int     # key-range splits per (request, KV head, row tile); 1 = no merge step
    split_size: int     # keys per split (multiple of KEYS_PER_STAGE)
    max_tiles: int      # bound on the row tiles over all requests (grid x)
    warps_m: int        # 0: 8 query rows per CTA (decode), 1: 16 rows (decode), 4: 64 rows (prefill)

    @property
    def rows(self) -> int:
        return 8 if self.warps_m == 0 else 16 * self.warps_m


def plan_attention(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int, max_seq_len: int,
                   sliding_window: Optional[int] = None, num_sms: int = 132, head_dim: int = 256,
                   decode_rows: Optional[int] = None) -> AttentionPlan:
    """Host-side plan from bounds the scheduler knows. Splits the key range when the
    (request × KV head × row tile) grid would leave the GPU under-filled (decode over long contexts).
    decode_rows (8 or 16) forces the decode kernel of a step that runs decode tiles (tests, sweeps)."""
    group = num_heads // num_kv_heads
    warps_m = 1 if num_tokens <= DECODE_MAX_Q * max(num_seqs, 1) else 4
    if warps_m == 1 and (decode_rows == 8 or (decode_rows is None and DECODE8 and num_tokens == num_seqs and
                                              group <= 8 and num_seqs * num_kv_heads >= DECODE8_MIN_CTAS)):
        warps_m = 0
    rows = 8 if warps_m == 0 else 16 * warps_m
    tiles_tok = -(-num_tokens * group // rows)
    max_tiles = tiles_tok + num_seqs
    # keys of a sliding layer's tile: at most the window plus the tile's queries. window + num_tokens is a
    # loose bound, kept: the tight one (window at decode) changes the split sizes and measured slower in
    # one H200 sweep (26B-A4B sliding layer at batch 100: 4 splits of 256 keys 363 us vs this plan's 5 of
    # 224, 337 us; E4B 65 vs 51 us), though that sweep timed the tight plan first, which may have cost it
    span = max_seq_len if not sliding_window else min(max_seq_len, sliding_window + num_tokens)
    span = max(span, 1)
    est = max(1, min(max_tiles, max(num_seqs, tiles_tok))) * num_kv_heads
    splits = 1
    if warps_m <= 1:
        # a decode CTA is two or four warps: several fit on an SM, and with few (request x KV head) pairs
        # only fine splits (down to one key stage) put enough loads in flight. The 8-row kernel (bulk copies)
        # keeps its loads in flight over a whole range: it is split only to fill the GPU (one CTA an SM at head
        # dim 512, whose CTA holds ~110 KB of stages, four at 256; H200 batch 100: 31B sliding unsplit 411 us vs
        # 465 in 5 splits, 26B-A4B full 128 vs 155 in 2), the 16-row kernel also into ~DECODE_SPLIT_KEYS-key pieces
        target = (CTAS_PER_SM if warps_m == 1 or head_dim <= 256 else 1) * num_sms
        if est < target:
            splits = min(-(-target // est), -(-span // KEYS_PER_STAGE))
        # (over long contexts the 8-row kernel is still cut into DECODE8_SPLIT_KEYS pieces: CTAs of similar
        # length leave no long last wave)
        piece = DECODE_SPLIT_KEYS if warps_m == 1 else DECODE8_SPLIT_KEYS
        splits = max(splits, min(-(-span // piece), MAX_FINE_SPLITS))
    elif est < 2 * num_sms:
        splits = max(1, min(-(-2 * num_sms // est), span // 256))
    # the fp32 partials of the splits: [splits, tokens, heads, head_dim]; a big step (a prompt beside decode
    # rows, decode tiles) with fine splits would need a GB of them, and their merge
    splits = max(1, min(splits, WORKSPACE_CAP_BYTES // max(1, 4 * num_tokens * num_heads * head_dim)))
    split_size = -(-span // splits)
    split_size = -(-split_size // KEYS_PER_STAGE) * KEYS_PER_STAGE
    splits = -(-span // split_size)
    return AttentionPlan(splits, split_size, max_tiles, warps_m)


def attention_workspace(plan: AttentionPlan, num_tokens: int, num_heads: int, head_dim: int,
                        device) -> tuple[torch.Tensor, torch.Tensor]:
    n = plan.num_splits if plan.num_splits > 1 else 0
    return (torch.empty(n, num_tokens, num_heads, head_dim, dtype=torch.float32, device=device),
            torch.empty(n, num_tokens, num_heads, dtype=torch.float32, device=device))


def paged_attention_planned(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            page_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                            sliding_window: Optional[int], block_ids: Optional[torch.Tensor], scale: float,
                            plan: AttentionPlan, out: torch.Tensor, ws_o: torch.Tensor,
                            ws_lse: torch.Tensor) -> torch.Tensor:
    """Device part: int32 metadata, caller-owned out and workspace; graph-capturable."""
    torch.ops.gemma4rt.paged_attention(
        q, k_cache, v_cache, page_table.to(torch.int32), cu_seqlens_q.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(), None if block_ids is None else block_ids.to(torch.int32).contiguous(),
        int(sliding_window or 0), float(scale), plan.num_splits, plan.split_size, plan.max_tiles, plan.warps_m,
        out, ws_o, ws_lse)
    return out


def native_attention_ok(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return (_native.use_native(q, k_cache, v_cache) and _native.has_op("paged_attention") and
            q.dtype in _native.HALF_TYPES and
            k_cache.dtype == q.dtype == v_cache.dtype and q.shape[-1] in NATIVE_HEAD_DIMS and
            q.shape[1] % k_cache.shape[2] == 0 and all(s % 8 == 0 for s in q.stride()[:-1]) and
            all(s % 8 == 0 for s in k_cache.stride()[:-1]) and all(s % 8 == 0 for s in v_cache.stride()[:-1]) and
            q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    page_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    sliding_window: Optional[int] = None, block_ids: Optional[torch.Tensor] = None,
                    scale: float = 1.0, zero_out: bool = False) -> torch.Tensor:
    """See reference.paged_attention. zero_out: rows past cu_seqlens_q[-1] (owned by no request) come out
    zero instead of unwritten."""
    if native_attention_ok(q, k_cache, v_cache) and q.shape[0] > 0:
        T, H, D = q.shape
        plan = plan_attention(T, seq_lens.shape[0], H, k_cache.shape[2], page_table.shape[1] * k_cache.shape[1],
                              sliding_window, head_dim=D)
        out = (torch.zeros if zero_out else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
        ws_o, ws_lse = attention_workspace(plan, T, H, D, q.device)
        return paged_attention_planned(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, sliding_window,
                                       block_ids, scale, plan, out, ws_o, ws_lse)
    out = ref.paged_attention(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, sliding_window, block_ids,
                              scale)
    if zero_out:
        out[int(cu_seqlens_q[-1]):] = 0
    return out
