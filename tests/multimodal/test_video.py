"""Video input: frames sampled from a real (PyAV-encoded) clip, Gemma 4's prompt form, and soft tokens
equal to transformers' video path (`pixel_values_videos`) on the tiny checkpoints, bidirectional
frame blocks included."""
import io
import os
import re
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _mm import hf_for, hf_video_inputs, prefill_logits, runner_for  # noqa: E402

from gemma4rt.frontend.mm_fetch import LoadedMedia  # noqa: E402
from gemma4rt.frontend.mm_preprocess import ExpandedPrompt, MediaPreprocessor  # noqa: E402
from gemma4rt.frontend.mm_video import decode_video  # noqa: E402

TOL = 1e-4


def mp4(n_frames: int, fps: int = 8, w: int = 64, h: int = 48) -> bytes:
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        rng = np.random.default_rng(0)
        for i in range(n_frames):
            img = np.clip(rng.integers(0, 255, (h, w, 3)) * 0.2 + i * 5, 0, 255).astype(np.uint8)
            for p in s.encode(__import__("av").VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_decode_samples_32_frames_uniformly():
    v = decode_video(mp4(80, fps=8))                       # 10 s
    assert len(v.frames) == 32 and v.frames[0].size == (64, 48)
    assert v.timestamps[0] == 0.0 and all(b > a for a, b in zip(v.timestamps, v.timestamps[1:]))
    assert 9.0 <= v.timestamps[-1] < 10.0
    short = decode_video(mp4(5))
    assert len(short.frames) == 5


@pytest.mark.parametrize("family", ["e", "dense", "unified"])
def test_video_prefill_matches_transformers(family, tiny_checkpoint):
    from transformers import AutoTokenizer
    path = tiny_checkpoint(family)
    tok = AutoTokenizer.from_pretrained(path)
    pre = MediaPreprocessor.from_model_dir(path)
    v = decode_video(mp4(24, fps=8), max_frames=3)
    items, repl = pre.video_items(LoadedMedia("video", v, "digest-v", 0, 70))
    assert re.fullmatch(r"00:00 <\|image>(<\|video\|>)+<image\|> 00:01 <\|image>(<\|video\|>)+<image\|> "
                        r"00:02 <\|image>(<\|video\|>)+<image\|>", repl), repl[:200]
    ids = [2] + tok.encode("Watch: " + repl + " What happens?", add_special_tokens=False)
    pre.place_video_items(ids, items)
    ours = prefill_logits(runner_for(path), ExpandedPrompt(ids, items))

    inp = hf_video_inputs(ids, items)
    tt = inp["mm_token_type_ids"]
    hf = hf_for(path)
    with torch.no_grad():
        if family == "unified":   # the generate-path masks (gemma4-architecture.md §6.5), as for images
            emb = hf.get_input_embeddings()(inp["input_ids"])
            inp["attention_mask"] = hf.create_masks_for_generate(hf.config, emb, None, None,
                                                                 torch.arange(emb.shape[1])[None],
                                                                 mm_token_type_ids=tt)
        ref = hf(**inp, use_cache=False).logits[0].float()
    err = (ours - ref).abs().max().item()
    print(f"[video parity] {family}: 3 frames x {items[0].num_tokens} tokens, max |Δlogit| {err:.2e}")
    assert err < TOL
