"""Front-door preprocessing: soft-token counts at the real geometry, patch layout, unified merge, prompt
expansion, content hashes."""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from _mm import image, media, waveform  # noqa: E402

from gemma4rt.frontend.mm_fetch import MediaError  # noqa: E402
from gemma4rt.frontend.mm_preprocess import MediaPreprocessor, merge_patches  # noqa: E402
from gemma4rt.worker.mm_inputs import decode_array  # noqa: E402

HUB = os.path.join(os.path.dirname(__file__), "..", "data", "configs", "config_hub_dialect.json")


def _real_geometry(unified=False):
    cfg = json.load(open(HUB))
    cfg["audio_config"] = {"model_type": "gemma4_audio", "subsampling_conv_channels": [128, 32]}
    if unified:
        cfg["model_type"] = "gemma4_unified"
        cfg["audio_config"] = {"model_type": "gemma4_unified_audio", "audio_embed_dim": 640}
    return MediaPreprocessor(cfg)


@pytest.mark.parametrize("hw,budget,n", [((480, 640), 280, 266), ((1080, 1920), 280, 264), ((768, 768), 280, 256),
                                         ((100, 2000), 280, 222), ((480, 640), 1120, 1064), ((480, 640), 70, 63)])
def test_image_soft_token_counts_at_real_geometry(hw, budget, n):
    pre = _real_geometry()
    arrays, got = pre.image_arrays(Image.new("RGB", (hw[1], hw[0]), (9, 99, 199)), budget)
    assert got == n
    pix, pos = decode_array(arrays["pixel_values"]), decode_array(arrays["image_position_ids"])
    assert pix.shape == (9 * n, 768) and pos.shape == (9 * n, 2) and (pos >= 0).all()


def test_patch_layout_row_col_channel():
    """480×640 @280 resizes to 672×912; patch (x, y) holds pixels [16y:16y+16, 16x:16x+16] as (row, col, ch)."""
    pre = _real_geometry()
    img = image(480, 640, 11)
    arrays, _ = pre.image_arrays(img, 280)
    pix, pos = decode_array(arrays["pixel_values"]), decode_array(arrays["image_position_ids"])
    ref = np.asarray(img.resize((912, 672), Image.BICUBIC), dtype=np.float32) / 255.0
    for j in (0, 57, 1000, pix.shape[0] - 1):
        x, y = pos[j]
        assert np.abs(pix[j] - ref[16 * y:16 * y + 16, 16 * x:16 * x + 16].reshape(-1)).max() < 2 / 255
    assert pos[1].tolist() == [1, 0] and pos[57].tolist() == [0, 1]                 # 57 patches per row


def test_unified_merged_patches():
    """Merged 48×48 patches equal 48-pixel patches cut from the same resized image."""
    pre = _real_geometry(unified=True)
    img = image(300, 410, 12)
    arrays, n = pre.image_arrays(img, 280)
    pix, pos = decode_array(arrays["pixel_values"]), decode_array(arrays["image_position_ids"])
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    big = Gemma4ImageProcessorPil(patch_size=48, pooling_kernel_size=1)(images=[img], max_soft_tokens=280,
                                                                         return_tensors="np")
    bpos = big["image_position_ids"][0]
    real = (bpos != -1).all(-1)
    assert n == int(real.sum()) and pix.shape == (n, 6912)
    assert np.array_equal(pix, big["pixel_values"][0][real]) and np.array_equal(pos, bpos[real])
    # merge_patches on a hand-made grid: 2×2 teacher patches of 1 px
    t = np.arange(4 * 4 * 3, dtype=np.float32).reshape(16, 3)
    tpos = np.array([[x, y] for y in range(4) for x in range(4)])
    m, mpos = merge_patches(t, tpos, 2, 1)
    assert mpos.tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert m[1].tolist() == t[[2, 3, 6, 7]].reshape(-1).tolist()


def test_audio_soft_token_counts():
    pre = _real_geometry()
    assert pre.audio_arrays(np.zeros(16000, np.float32))[1] == 25
    arrays, n = pre.audio_arrays(np.zeros(30 * 16000, np.float32))          # the longest clip
    assert n == 750 and decode_array(arrays["input_features"]).shape[1] == 128
    from gemma4rt.frontend.mm_fetch import LoadedMedia, MediaError
    with pytest.raises(MediaError, match="40.0 s"):                         # refused, never cut
        pre.make_item(LoadedMedia("audio", np.zeros(40 * 16000, np.float32), "d", 2))
    uni = _real_geometry(unified=True)
    arrays, n = uni.audio_arrays(np.ones(16000 + 1, np.float32))
    assert n == 26 and decode_array(arrays["input_features"]).shape == (26, 640)


def test_prompt_expansion_and_items(tiny_checkpoint):
    path = tiny_checkpoint("e")
    pre = MediaPreprocessor.from_model_dir(path, default_image_tokens=70)
    IMG, AUD = pre.ids["image_token_id"], pre.ids["audio_token_id"]
    ms = [media("image", image(40, 56, 1), "a"), media("audio", waveform(0.2, 2), "b"),
          media("image", image(20, 20, 3), "c", budget=140)]
    exp = pre.expand_prompt([2, 10, IMG, 11, AUD, IMG, 12], ms)
    ids = exp.token_ids
    i0, a0, i1 = exp.mm_items
    assert [i0.modality, a0.modality, i1.modality] == ["image", "audio", "image"]
    assert ids[:3] == [2, 10, pre.ids["boi_token_id"]] and i0.offset == 3
    assert ids[i0.offset:i0.offset + i0.num_tokens] == [IMG] * i0.num_tokens
    assert ids[i0.offset + i0.num_tokens:i0.offset + i0.num_tokens + 2] == [pre.ids["eoi_token_id"], 11]
    assert ids[a0.offset - 1] == pre.ids["boa_token_id"] and ids[a0.offset + a0.num_tokens] == pre.ids["eoa_token_id"]
    assert ids[i1.offset - 1] == pre.ids["boi_token_id"] and ids[-1] == 12
    assert len(ids) == 7 - 3 + sum(it.num_tokens + 2 for it in exp.mm_items)
    assert not i0.bidirectional                                          # E-series: causal
    # hashes: same media + budget → same hash; the budget is part of it
    again = pre.make_item(media("image", image(40, 56, 1), "a"))[0]
    other = pre.make_item(media("image", image(40, 56, 1), "a", budget=140))[0]
    assert again.content_hash == i0.content_hash != other.content_hash
    with pytest.raises(MediaError, match="placeholders"):
        pre.expand_prompt([2, IMG, IMG], ms[:1])
    with pytest.raises(MediaError, match="max_soft_tokens"):
        pre.make_item(media("image", image(8, 8, 0), "x", budget=100))
    dense = MediaPreprocessor.from_model_dir(tiny_checkpoint("dense"))
    with pytest.raises(MediaError, match="audio"):
        dense.make_item(media("audio", waveform(0.1, 0), "y"))
    assert dense.make_item(media("image", image(8, 8, 0), "z"))[0].bidirectional
