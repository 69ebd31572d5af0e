"""KV store and paged attention (prefill and decode). Native kernels in csrc/attention/; specs in
reference.py.

The native attention splits into a host-side plan (`plan_attention`: tile and split sizes from
host-known bounds only — token count, request count, page-table width — never from device values)
and a device-side run (`paged_attention_planned`) that a CUDA graph can capture."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from gemma4rt.ops import _native
from gemma4rt.ops import reference as ref

KEYS_PER_STAGE = 32     # the kernel's key tile; split sizes are multiples of it
DECODE_MAX_Q = 8        # a step of at most this many query rows per request runs decode tiles (8 or 16 rows)
# A mixed step (prompt chunks of more than DECODE_MAX_Q tokens beside one-token requests) runs two launches:
# the one-token requests with the decode kernels, the others with 64-row prefill tiles (`mixed_step`).
# GEMMA4RT_MIXED_ATTN=0: one launch of 16-row tiles for every row (or 64-row past DECODE_MAX_Q rows a request).
MIXED_ATTN = os.environ.get("GEMMA4RT_MIXED_ATTN", "1") != "0"
# A pure decode step (one token per request) of a layer with at most 8 query heads per KV head runs the 8-row
# decode kernel (keys on the MMA's M side) once it has DECODE8_MIN_CTAS (request x KV head) pairs;
# GEMMA4RT_DECODE8=0 keeps the 16-row tiles. H200 (bench/kernels/decode_sweep.py, us per layer, 8-row vs
# 16-row, both with bulk K/V copies): batch 100 26B-A4B sliding 241 vs 268, 31B full 266 vs 304, E4B sliding
# 42 vs 48; batch 1 (one 32-key split a CTA) E2B sliding 12.2 vs 10.8, 26B-A4B full 16.9 vs 15.8, 31B sliding
# (16 KV heads) 17.5 vs 22.5.
DECODE8 = os.environ.get("GEMMA4RT_DECODE8", "1") != "0"
DECODE8_MIN_CTAS = 16
# Split decode attention until about CTAS_PER_SM CTAs per SM, down to one-stage (32-key) splits. Fewer, longer
# splits that the kernel could merge itself do not pay: H200, batch-1 TPOT at a 1k context with at most 8 / 4
# splits against this plan (~35 splits and a merge launch), same call: E2B 4.04-4.38 / 4.02-4.33 vs 3.22-3.29 ms,
# E4B 5.45 / 5.38 vs 4.67, 26B-A4B 5.23 / 5.44 vs 4.22.
CTAS_PER_SM = 4
# Decode key ranges are also cut to about this many keys (at most MAX_FINE_SPLITS pieces) even when the
# (request x KV head) grid already fills the GPU: short CTAs balance uneven contexts and leave no long last
# wave. H200, batch 100, contexts uniform on [1, 2199] as in serving (decode_sweep --contexts spread, µs per
# layer, 512-key pieces / unsplit / 256-key pieces): 8-row kernel 26B-A4B full 158 / 214 / 167, sliding 195 /
# 205 / 186, 31B full 287 / 321 / 306, E2B full 92 / 205 / 95; 16-row 12B full 106 / 284 / 112. With every
# context at 1.1k the unsplit 8-row kernel is faster on the 26B-A4B's full layer (128 vs 142) and the 31B's
# sliding one (407 vs 434).
DECODE_SPLIT_KEYS = 512
MAX_FINE_SPLITS = 16
NATIVE_HEAD_DIMS = (256, 512)
WORKSPACE_CAP_BYTES = 256 << 20    # split partials of one attention call
# Split partials are merged inside the attention kernel by the last split CTA of each (row tile, KV head),
# counted in a per-device int32 buffer of MERGE_COUNTER_SLOTS (zeros; each count resets itself): H200, batch
# 100, 12B decode step 18.9 vs 19.9 ms of GPU time with merge launches. Over more than FUSED_MERGE_MAX_SPLITS
# splits (batch-1 decode: ~35 one-stage splits) one CTA's serial walk over them costs more than the merge
# launch (E2B batch-1 TPOT 4.06 vs ~3.2 ms); so do a plan of more tiles than the buffer counts, a buffer
# first wanted during CUDA-graph capture, and GEMMA4RT_FUSED_MERGE=0: a merge launch.
FUSED_MERGE = os.environ.get("GEMMA4RT_FUSED_MERGE", "1") != "0"
FUSED_MERGE_MAX_SPLITS = 8
MERGE_COUNTER_SLOTS = 1 << 18


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
    q_sel: int = 0      # requests covered: 0 all, 1 those of one query token, 2 the others (a mixed step)

    @property
    def rows(self) -> int:
        return 8 if self.warps_m == 0 else 16 * self.warps_m


def plan_attention(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int, max_seq_len: int,
                   sliding_window: Optional[int] = None, num_sms: int = 132, head_dim: int = 256,
                   decode_rows: Optional[int] = None, q_sel: int = 0,
                   ws_tokens: Optional[int] = None) -> AttentionPlan:
    """Host-side plan from bounds the scheduler knows. Splits the key range when the
    (request × KV head × row tile) grid would leave the GPU under-filled (decode over long contexts).
    decode_rows (8 or 16) forces the decode kernel of a step that runs decode tiles (tests, sweeps).
    q_sel: one launch of a mixed step (see mixed_step): 1 its one-token requests (at most num_seqs of
    them), 2 the others (64-row tiles). ws_tokens: the token count the split partials are indexed by."""
    if q_sel == 1:      # as a pure decode step of num_seqs requests, its partials indexed by all the tokens
        return replace(plan_attention(num_seqs, num_seqs, num_heads, num_kv_heads, max_seq_len, sliding_window,
                                      num_sms, head_dim, decode_rows, ws_tokens=num_tokens), q_sel=1)
    group = num_heads // num_kv_heads
    warps_m = 1 if num_tokens <= DECODE_MAX_Q * max(num_seqs, 1) and q_sel == 0 else 4
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
    if q_sel == 2:      # a mixed step's prompt rows: the one-token requests' tiles are not theirs
        est = tiles_tok * num_kv_heads
    splits = 1
    if warps_m <= 1:
        # a decode CTA is two or four warps: several fit on an SM, and with few (request x KV head) pairs
        # only fine splits (down to one key stage) put enough loads in flight. The 8-row kernel (bulk copies)
        # keeps its loads in flight over a whole range: it is split to fill the GPU only to one CTA an SM at
        # head dim 512 (its CTA holds ~110 KB of stages), four at 256; then both into DECODE_SPLIT_KEYS pieces
        target = (CTAS_PER_SM if warps_m == 1 or head_dim <= 256 else 1) * num_sms
        if est < target:
            splits = min(-(-target // est), -(-span // KEYS_PER_STAGE))
        splits = max(splits, min(-(-span // DECODE_SPLIT_KEYS), MAX_FINE_SPLITS))
    elif est < 2 * num_sms:
        splits = max(1, min(-(-2 * num_sms // est), span // 256))
    splits = max(1, min(splits, _workspace_splits(ws_tokens or num_tokens, num_heads, head_dim)))
    split_size = -(-span // splits)
    split_size = -(-split_size // KEYS_PER_STAGE) * KEYS_PER_STAGE
    splits = -(-span // split_size)
    return AttentionPlan(splits, split_size, max_tiles, warps_m, q_sel)


def _workspace_splits(num_tokens: int, num_heads: int, head_dim: int) -> int:
    """The most splits whose fp32 partials ([splits, tokens, heads, head_dim]) fit WORKSPACE_CAP_BYTES: a big
    step (a prompt beside decode rows) with fine splits would need a GB of them, and their merge."""
    return max(1, WORKSPACE_CAP_BYTES // max(1, 4 * num_tokens * num_heads * head_dim))


def mixed_step(q_lens) -> bool:
    """Whether a step of these per-request query lengths runs attention as two launches (MIXED_ATTN): it has
    one-token requests and a prompt chunk longer than DECODE_MAX_Q."""
    return MIXED_ATTN and any(n == 1 for n in q_lens) and any(n > DECODE_MAX_Q for n in q_lens)


def attention_workspace(plan, num_tokens: int, num_heads: int, head_dim: int,
                        device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split partials for a plan, or for a list of plans run one after another (each merges before the
    next launch writes)."""
    plans = plan if isinstance(plan, (list, tuple)) else [plan]
    n = max(p.num_splits for p in plans)
    n = n if n > 1 else 0
    return (torch.empty(n, num_tokens, num_heads, head_dim, dtype=torch.float32, device=device),
            torch.empty(n, num_tokens, num_heads, dtype=torch.float32, device=device))


def merge_counters(device: torch.device) -> Optional[torch.Tensor]:
    """The device's split-merge counters (made on first use; call before capturing CUDA graphs)."""
    return _native.zero_counters("attn_merge", MERGE_COUNTER_SLOTS, device)


def _counters_for(plan: AttentionPlan, num_kv_heads: int, device) -> Optional[torch.Tensor]:
    if (not FUSED_MERGE or not 1 < plan.num_splits <= FUSED_MERGE_MAX_SPLITS
            or plan.max_tiles * num_kv_heads > MERGE_COUNTER_SLOTS):
        return None
    return merge_counters(device)


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
        out, ws_o, ws_lse, plan.q_sel, _counters_for(plan, k_cache.shape[2], q.device))
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
                    scale: float = 1.0, zero_out: bool = False, mixed: bool = False) -> torch.Tensor:
    """See reference.paged_attention. zero_out: rows past cu_seqlens_q[-1] (owned by no request) come out
    zero instead of unwritten. mixed: the step may hold one-token requests beside prompt chunks (see
    mixed_step): two launches, each covering its own requests."""
    if native_attention_ok(q, k_cache, v_cache) and q.shape[0] > 0:
        T, H, D = q.shape
        B, span = seq_lens.shape[0], page_table.shape[1] * k_cache.shape[1]
        if mixed and T > B:
            plans = [plan_attention(T, B, H, k_cache.shape[2], span, sliding_window, head_dim=D, q_sel=s)
                     for s in (1, 2)]
        else:
            plans = [plan_attention(T, B, H, k_cache.shape[2], span, sliding_window, head_dim=D)]
        out = (torch.zeros if zero_out else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
        ws_o, ws_lse = attention_workspace(plans, T, H, D, q.device)
        for plan in plans:
            paged_attention_planned(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, sliding_window,
                                    block_ids, scale, plan, out, ws_o, ws_lse)
        return out
    out = ref.paged_attention(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, sliding_window, block_ids,
                              scale)
    if zero_out:
        out[int(cu_seqlens_q[-1]):] = 0
    return out
