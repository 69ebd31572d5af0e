"""plan_attention: the host-side split plan of the native paged attention (no GPU needed)."""
import pytest

from gemma4rt.ops.attention import CTAS_PER_SM, KEYS_PER_STAGE, plan_attention


@pytest.mark.parametrize("span,window", [(2048, 512), (2048, None), (40, None)])
def test_batch1_decode_splits_the_keys_finely(span, window):
    p = plan_attention(1, 1, 8, 1, span, window)
    keys = min(span, window + 1) if window else span
    assert p.warps_m == 1
    assert p.split_size % KEYS_PER_STAGE == 0
    assert p.num_splits * p.split_size >= keys > (p.num_splits - 1) * p.split_size    # covers, no empty split
    assert p.num_splits == -(-keys // KEYS_PER_STAGE)          # one key stage per split: all the parallelism


def test_enough_ctas_means_no_split_and_prefill_is_not_split_finely():
    assert plan_attention(64, 64, 32, 16, 4096, 1024).num_splits == 1    # 1024 CTAs already
    big = plan_attention(4096, 1, 8, 1, 4096, None)
    assert big.warps_m == 4 and big.num_splits == 1
    mid = plan_attention(64, 64, 8, 1, 2048, 512)                        # 64 CTAs: split up to the target
    assert 1 < mid.num_splits and 64 * mid.num_splits >= CTAS_PER_SM * 132 // 2
