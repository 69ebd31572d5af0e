"""plan_attention: the host-side split plan of the native paged attention (no GPU needed)."""
import pytest

from gemma4rt.ops.attention import (CTAS_PER_SM, DECODE_SPLIT_KEYS, KEYS_PER_STAGE, MAX_FINE_SPLITS,
                                    plan_attention)


@pytest.mark.parametrize("span,window", [(2048, 512), (2048, None), (40, None)])
def test_batch1_decode_splits_the_keys_finely(span, window):
    p = plan_attention(1, 1, 8, 1, span, window)
    keys = min(span, window + 1) if window else span
    assert p.warps_m == 1
    assert p.split_size % KEYS_PER_STAGE == 0
    assert p.num_splits * p.split_size >= keys > (p.num_splits - 1) * p.split_size    # covers, no empty split
    assert p.num_splits == -(-keys // KEYS_PER_STAGE)          # one key stage per split: all the parallelism


def test_enough_ctas_still_splits_decode_into_short_ranges_and_prefill_is_not_split_finely():
    full = plan_attention(64, 64, 32, 16, 4096, 1024)                    # 1024 CTAs already
    assert full.num_splits == -(-(1024 + 64) // DECODE_SPLIT_KEYS) and full.split_size <= DECODE_SPLIT_KEYS
    long = plan_attention(100, 100, 16, 2, 65536, None)                  # long context: the split count is capped
    assert long.num_splits == MAX_FINE_SPLITS and long.num_splits * long.split_size >= 65536
    short = plan_attention(100, 100, 16, 8, 160, 1024)                   # short context: nothing to cut
    assert short.num_splits == 1
    big = plan_attention(4096, 1, 8, 1, 4096, None)
    assert big.warps_m == 4 and big.num_splits == 1
    mid = plan_attention(64, 64, 8, 1, 2048, 512)                        # 64 CTAs: split up to the target
    assert 1 < mid.num_splits and 64 * mid.num_splits >= CTAS_PER_SM * 132 // 2
