"""plan_attention: the host-side split plan of the native paged attention (no GPU needed)."""
import pytest

from gemma4rt.ops.attention import (CTAS_PER_SM, DECODE8, DECODE_SPLIT_KEYS, KEYS_PER_STAGE, MAX_FINE_SPLITS,
                                    plan_attention)


@pytest.mark.parametrize("span,window", [(2048, 512), (2048, None), (40, None)])
def test_batch1_decode_splits_the_keys_finely(span, window):
    p = plan_attention(1, 1, 8, 1, span, window)
    keys = min(span, window + 1) if window else span
    assert p.rows == 16         # one (request x KV head) pair: the 16-row kernel
    assert p.split_size % KEYS_PER_STAGE == 0
    assert p.num_splits * p.split_size >= keys > (p.num_splits - 1) * p.split_size    # covers, no empty split
    assert p.num_splits == -(-keys // KEYS_PER_STAGE)          # one key stage per split: all the parallelism


def test_enough_ctas_still_splits_decode_into_short_ranges_and_prefill_is_not_split_finely():
    full = plan_attention(64, 64, 32, 16, 4096, 1024, decode_rows=16)    # 1024 CTAs already
    assert full.num_splits == -(-(1024 + 64) // DECODE_SPLIT_KEYS) and full.split_size <= DECODE_SPLIT_KEYS
    # the 8-row kernel: into DECODE_SPLIT_KEYS pieces, and finer only to fill the GPU to 4 CTAs an SM at head
    # dim 256, 1 at 512
    assert plan_attention(64, 64, 32, 16, 4096, 1024, decode_rows=8).num_splits == full.num_splits
    assert plan_attention(100, 100, 16, 2, DECODE_SPLIT_KEYS, None, head_dim=512, decode_rows=8).num_splits == 1
    assert plan_attention(100, 100, 16, 2, 2048, None, head_dim=512, decode_rows=8).num_splits == 2048 // DECODE_SPLIT_KEYS
    assert plan_attention(100, 100, 8, 1, DECODE_SPLIT_KEYS, None, head_dim=512, decode_rows=8).num_splits == 2
    assert plan_attention(100, 100, 8, 1, 4096, 512, decode_rows=8).num_splits == -(-(512 + 100) // 128)
    for rows in (8, 16):                                                 # long context: the split count is capped
        long = plan_attention(100, 100, 16, 2, 65536, None, decode_rows=rows)
        assert long.num_splits == MAX_FINE_SPLITS and long.num_splits * long.split_size >= 65536
    short = plan_attention(100, 100, 16, 8, 160, 1024)                   # short context: nothing to cut
    assert short.num_splits == 1
    big = plan_attention(4096, 1, 8, 1, 4096, None)
    assert big.warps_m == 4 and big.num_splits == 1
    mid = plan_attention(64, 64, 8, 1, 2048, 512)                        # 64 CTAs: split up to the target
    assert 1 < mid.num_splits and 64 * mid.num_splits >= CTAS_PER_SM * 132 // 2


def _tile_key_spans(q_lens, seq_lens, group, rows, window, bidirectional):
    """The kernel's key range length of every row tile (see attn_kernel: k_lo .. k_hi)."""
    out = []
    for n_q, L in zip(q_lens, seq_lens):
        first_q = L - n_q
        for row0 in range(0, n_q * group, rows):
            nrows = min(rows, n_q * group - row0)
            minq = first_q + row0 // group
            maxq = first_q + (row0 + nrows - 1) // group
            k_lo = max(0, minq - window + 1) if window else 0
            k_hi = L if bidirectional else maxq + 1
            out.append(k_hi - k_lo)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_plan_covers_every_tile_key_range(seed, bidirectional):
    """The splits (num_splits x split_size keys from each tile's first key) must cover every row tile's
    key range, for decode, speculative and prefill-sized steps, with and without image blocks."""
    import random
    rng = random.Random(seed)
    for _ in range(40):
        H, KVH = rng.choice([(8, 1), (16, 8), (32, 16), (12, 4), (16, 2)])
        window = rng.choice([None, 512, 1024, 100])
        kind = rng.choice(["decode", "spec", "prefill"])
        B = rng.randint(1, 60)
        q_lens = [1 if kind == "decode" else rng.randint(1, 8) if kind == "spec" else rng.randint(1, 300)
                  for _ in range(B)]
        seq_lens = [q + rng.randint(0, 3000) for q in q_lens]
        S = 16
        width = max(-(-L // S) for L in seq_lens)
        p = plan_attention(sum(q_lens), B, H, KVH, width * S, window)
        spans = _tile_key_spans(q_lens, seq_lens, H // KVH, p.rows, window, bidirectional)
        assert max(spans) <= p.num_splits * p.split_size, (p, max(spans), H, KVH, window, kind)


def test_split_workspace_is_capped():
    """A big step in decode tiles (a prompt beside decode rows) would need a GB of fp32 split partials
    for a 512-wide full layer; the plan keeps them under WORKSPACE_CAP_BYTES and still covers the keys."""
    from gemma4rt.ops.attention import WORKSPACE_CAP_BYTES
    T, H, D = 700, 32, 512
    p = plan_attention(T, 101, H, 4, 4096, None, head_dim=D)
    assert p.warps_m == 1
    assert p.num_splits * T * H * D * 4 <= WORKSPACE_CAP_BYTES
    assert p.num_splits * p.split_size >= 4096
    small = plan_attention(100, 100, 16, 8, 4096, 1024, head_dim=256)    # decode: far below the cap
    assert small == plan_attention(100, 100, 16, 8, 4096, 1024)


def test_decode_kernel_choice():
    """Pure decode steps of layers with at most 8 query heads per KV head take the 8-row kernel; more heads
    per KV head (the 12B's full layers), speculative rows and prompt chunks keep 16-row or prefill tiles;
    decode_rows forces either decode kernel; the tile bound counts the chosen rows."""
    if DECODE8:
        assert plan_attention(100, 100, 16, 8, 2048, 1024).warps_m == 0
        assert plan_attention(100, 100, 32, 4, 2048, None, head_dim=512).warps_m == 0
        assert plan_attention(1, 1, 32, 16, 2048, 1024).warps_m == 0                 # 16 KV heads at batch 1
    assert plan_attention(1, 1, 16, 8, 2048, 1024).warps_m == 1                       # 8 pairs: 16-row tiles
    assert plan_attention(100, 100, 16, 1, 2048, None, head_dim=512).warps_m == 1      # group 16
    assert plan_attention(400, 100, 16, 8, 2048, 1024).warps_m == 1                   # 4 tokens a request
    assert plan_attention(100, 100, 16, 8, 2048, 1024, decode_rows=16).warps_m == 1
    forced = plan_attention(400, 100, 16, 8, 2048, 1024, decode_rows=8)
    assert forced.warps_m == 0 and forced.max_tiles == -(-400 * 2 // 8) + 100
    assert plan_attention(5000, 2, 16, 8, 8192, 1024, decode_rows=8).warps_m == 4     # prefill stays prefill


@pytest.mark.parametrize("H,KVH,D,window", [(16, 8, 256, 1024), (16, 2, 512, None), (16, 1, 512, None),
                                            (8, 1, 256, 512), (32, 16, 256, 1024)])
def test_mixed_step_plans(H, KVH, D, window):
    """A mixed step's two launches: the one-token requests as a pure decode step of that many requests (the
    8-row kernel where a pure decode step would take it) whose split partials are indexed by every token; the
    prompt rows in 64-row tiles, split while their grid is under two CTAs an SM."""
    from gemma4rt.ops.attention import WORKSPACE_CAP_BYTES, mixed_step
    T, B, span = 700, 101, 4096
    dec = plan_attention(T, B, H, KVH, span, window, head_dim=D, q_sel=1)
    pure = plan_attention(B, B, H, KVH, span, window, head_dim=D)
    assert dec.q_sel == 1 and dec.warps_m == pure.warps_m and dec.max_tiles == pure.max_tiles
    assert dec.num_splits * T * H * D * 4 <= WORKSPACE_CAP_BYTES
    keys = min(span, window + B) if window else span
    assert dec.num_splits * dec.split_size >= keys
    pre = plan_attention(T, B, H, KVH, span, window, head_dim=D, q_sel=2)
    assert pre.q_sel == 2 and pre.warps_m == 4 and pre.max_tiles >= -(-T * (H // KVH) // 64)
    assert pre.num_splits * pre.split_size >= (min(span, window + T) if window else span)
    if -(-T * (H // KVH) // 64) * KVH >= 2 * 132:
        assert pre.num_splits == 1
    # a short chunk over a long context is split
    assert plan_attention(B + 40, B, H, KVH, 65536, None, head_dim=D, q_sel=2).num_splits > 1
    assert mixed_step([1, 1, 600]) and mixed_step([600, 1])
    assert not mixed_step([1, 1, 1]) and not mixed_step([600, 300]) and not mixed_step([4, 1, 8])
