"""bench/workloads.py: SGLang's random length recipe, synthetic ids, the image workload."""
import base64
import io

import numpy as np
import pytest

from bench.workloads import (DEFAULT_TOKEN_RANGE, make_png, parse_resolution, random_lengths,
                             sample_image_requests, sample_random_requests)


@pytest.mark.parametrize("n, total_in, total_out", [(10, 6101, 4220), (1000, 512842, 510855)])
def test_cookbook_totals_with_seed_1(n, total_in, total_out):
    # performance-targets.md §2.4: the SGLang cookbook's published totals for 1024/1024, ratio 0, seed 1
    reqs = sample_random_requests(n, 1024, 1024, 0.0, seed=1)
    assert sum(r.prompt_len for r in reqs) == total_in
    assert sum(r.output_len for r in reqs) == total_out
    assert all(len(r.input_ids) == r.prompt_len for r in reqs)


def test_lengths_match_global_numpy_stream():
    np.random.seed(1)
    expect_in = np.random.randint(1, 1025, 50)
    expect_out = np.random.randint(1, 1025, 50)
    got_in, got_out = random_lengths(50, 1024, 1024, 0.0, np.random.RandomState(1))
    assert (got_in == expect_in).all() and (got_out == expect_out).all()


def test_bounds_and_range_ratio():
    ins, outs = random_lengths(5000, 1000, 300, 0.5, np.random.RandomState(3))
    assert ins.min() >= 500 and ins.max() <= 1000
    assert outs.min() >= 150 and outs.max() <= 300
    assert ins.min() == 500 and ins.max() == 1000        # both ends reachable (inclusive upper bound)
    ins, outs = random_lengths(100, 1024, 1024, 0.0, np.random.RandomState(1))
    assert ins.min() >= 1 and outs.min() >= 1
    ins, outs = random_lengths(20, 64, 7, 1.0, np.random.RandomState(1))
    assert set(ins) == {64} and set(outs) == {7}
    with pytest.raises(ValueError):
        random_lengths(1, 10, 10, 1.5, np.random.RandomState(1))


def test_determinism_and_id_range():
    a = sample_random_requests(20, 256, 64, 0.0, seed=1)
    b = sample_random_requests(20, 256, 64, 0.0, seed=1)
    c = sample_random_requests(20, 256, 64, 0.0, seed=2)
    assert [r.input_ids for r in a] == [r.input_ids for r in b]
    assert [r.prompt_len for r in a] != [r.prompt_len for r in c]
    low, high = DEFAULT_TOKEN_RANGE
    assert all(low <= t < high for r in a for t in r.input_ids)
    firsts = [r.input_ids[0] for r in a]
    assert len(set(firsts)) == len(firsts)                # no two prompts share a prefix
    small = sample_random_requests(5, 32, 4, 0.0, seed=1, id_range=(10, 20))
    assert all(10 <= t < 20 for r in small for t in r.input_ids)


def test_word_prompts_for_chat_without_tokenizer():
    reqs = sample_random_requests(3, 50, 8, 1.0, seed=1, mode="words")
    assert all(r.input_ids is None and len(r.text.split()) == 50 for r in reqs)


def test_image_requests_are_distinct_720p_pngs():
    from PIL import Image

    reqs = sample_image_requests(2, 128, 1024, 0.0, seed=1, image_count=2, resolution="720p")
    uris = [u for r in reqs for u in r.images]
    assert len(uris) == 4 and len(set(uris)) == 4
    for r in reqs:
        assert 1 <= r.prompt_len <= 128 and 1 <= r.output_len <= 1024 and r.text
    for u in uris:
        head, b64 = u.split(",", 1)
        assert head == "data:image/png;base64"
        raw = base64.b64decode(b64)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = Image.open(io.BytesIO(raw))
        assert img.format == "PNG" and img.size == (1280, 720) and img.mode == "RGB"
        assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 100      # not a flat image


def test_resolutions():
    assert parse_resolution("720p") == (1280, 720)
    assert parse_resolution("1080x1920") == (1920, 1080)                        # SGLang: height x width
    with pytest.raises(ValueError):
        parse_resolution("huge")
    png = make_png(np.random.RandomState(0), 854, 480, "noise")
    from PIL import Image
    assert Image.open(io.BytesIO(png)).size == (854, 480)
