"""Each tower and embedder against transformers on the tiny checkpoints (fp32, ≤1e-4), and the loader's
multimodal key mapping."""
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _mm import hf_for, runner_for  # noqa: E402

from gemma4rt.model.gemma4 import Gemma4Model  # noqa: E402
from gemma4rt.model.loader import _strip_prefix, init_dummy_weights, load_config, load_weights  # noqa: E402


def _grid(w, h, n_pad):
    return [[x, y] for y in range(h) for x in range(w)] + [[-1, -1]] * n_pad


def _two_images(patch_dim, g):
    """Two images of 4×6 and 6×2 patches (k = 2), each padded to 32 patches."""
    pos = torch.tensor([_grid(4, 6, 8), _grid(6, 2, 20)])
    pix = torch.rand(2, 32, patch_dim, generator=g)
    pix[pos[..., 0] < 0] = 0.0
    return pix, pos


@pytest.mark.parametrize("family", ["e", "dense"])
def test_image_features_match(family, tiny_checkpoint):
    """On-device ViT (clipped linears) and large ViT (standardize): padded batch of two images."""
    path = tiny_checkpoint(family)
    model, hf = runner_for(path).model, hf_for(path)
    pix, pos = _two_images(48, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.model.get_image_features(pix, pos).pooler_output
        for i in range(2):
            ours = model.encode_image(pix[i], pos[i])
            real = (pos[i] != -1).all(-1)
            ours_nopad = model.encode_image(pix[i][real], pos[i][real])      # what the front door sends
            assert ours.shape == ref[i].shape == (int(real.sum()) // 4, 64)
            err = max((ours - ref[i]).abs().max().item(), (ours_nopad - ref[i]).abs().max().item())
            print(f"[mm parity] {family} image {i}: max |Δ| = {err:.2e} (scale {ref[i].abs().max().item():.2f})")
            assert err < 1e-4


def test_audio_features_match(tiny_checkpoint):
    """Conformer: SSCP, rel-pos chunked attention (several chunks), light conv; masked tail frames."""
    path = tiny_checkpoint("e")
    model, hf = runner_for(path).model, hf_for(path)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 75, 16, generator=g)
    mask = torch.ones(1, 75, dtype=torch.bool)
    mask[:, 61:] = False
    with torch.no_grad():
        out = hf.model.get_audio_features(feats, mask)
        ref = out.pooler_output[out.attention_mask]
        ours = model.encode_audio(feats[0], mask[0])
    assert ours.shape == ref.shape == (16, 64)
    err = (ours - ref).abs().max().item()
    print(f"[mm parity] e audio: max |Δ| = {err:.2e} (scale {ref.abs().max().item():.2f})")
    assert err < 1e-4


def test_unified_embedders_match(tiny_checkpoint):
    path = tiny_checkpoint("unified")
    model, hf = runner_for(path).model, hf_for(path)
    g = torch.Generator().manual_seed(3)
    pos = torch.tensor([_grid(3, 4, 4)])
    pix = torch.rand(1, 16, 48, generator=g)
    wav = torch.randn(1, 7, 40, generator=g)
    wmask = torch.ones(1, 7, dtype=torch.bool)
    with torch.no_grad():
        ref_img = hf.model.get_image_features(pix, pos).pooler_output[0]
        ours_img = model.encode_image(pix[0], pos[0])
        ref_aud = hf.model.get_audio_features(wav, wmask).pooler_output[0]
        ours_aud = model.encode_audio(wav[0], wmask[0])
        ours_raw = model.encode_audio(wav[0].reshape(-1)[:-13])       # raw samples, last frame zero-padded
        ref_raw = hf.model.get_audio_features(torch.cat([wav[0].reshape(-1)[:-13], torch.zeros(13)]).view(1, 7, 40),
                                              wmask).pooler_output[0]
    assert ours_img.shape == (12, 64) and ours_aud.shape == (7, 64)
    errs = [(ours_img - ref_img).abs().max().item(), (ours_aud - ref_aud).abs().max().item(),
            (ours_raw - ref_raw).abs().max().item()]
    print(f"[mm parity] unified image / audio / raw audio: {errs}")
    assert max(errs) < 1e-4


def test_loader_maps_multimodal_names(tiny_checkpoint, tmp_path):
    """Checkpoint names, transformers' in-memory unified names, and an inert pooler.scale key."""
    cfg = load_config(tiny_checkpoint("unified"))
    assert _strip_prefix("model.vision_embedder.patch_ln1.weight", cfg) == "vision_embedder.patch_ln1.weight"
    assert _strip_prefix("model.embed_vision.patch_dense.bias", cfg) == "vision_embedder.patch_dense.bias"
    assert _strip_prefix("model.embed_vision.multimodal_embedder.embedding_projection.weight", cfg) == \
        "embed_vision.embedding_projection.weight"
    assert _strip_prefix("model.embed_audio.embedding_projection.weight", cfg) == "embed_audio.embedding_projection.weight"
    # an `e` checkpoint with an extra pooler.scale tensor loads, and the towers equal the plain load
    from safetensors.torch import load_file, save_file
    src = tiny_checkpoint("e")
    d = tmp_path / "e-extra"
    shutil.copytree(src, d)
    st = load_file(str(d / "model.safetensors"))
    st["model.vision_tower.pooler.scale"] = torch.tensor(1.0)
    save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = load_config(str(d))
    with torch.device("meta"):
        m = Gemma4Model(cfg)
    load_weights(m, cfg, str(d), torch.float32, torch.device("cpu"), progress=False)
    ref = runner_for(src).model
    w = m.vision_tower.encoder.layers[0].self_attn.q_proj
    assert torch.equal(w.input_max, ref.vision_tower.encoder.layers[0].self_attn.q_proj.input_max)
    assert torch.isfinite(w.input_max) and w.clipped
    assert torch.equal(m.audio_tower.layers[1].self_attn.per_dim_scale, ref.audio_tower.layers[1].self_attn.per_dim_scale)


def test_dummy_weights_build_the_towers(tiny_checkpoint):
    """--load-format dummy: clip bounds become ±inf (no clipping) and the encoders run."""
    cfg = load_config(tiny_checkpoint("e"))
    with torch.device("meta"):
        m = Gemma4Model(cfg)
    init_dummy_weights(m, torch.float32, torch.device("cpu"))
    q = m.vision_tower.encoder.layers[0].self_attn.q_proj
    assert q.input_min.item() == float("-inf") and q.output_max.item() == float("inf")
    pos = torch.tensor(_grid(4, 2, 0))
    img = m.encode_image(torch.rand(8, 48), pos)
    aud = m.encode_audio(torch.randn(20, 16), torch.ones(20, dtype=torch.bool))
    assert img.shape == (2, 64) and aud.shape == (5, 64)
    assert torch.isfinite(img).all() and torch.isfinite(aud).all()


def test_bf16_towers_track_fp32(tiny_checkpoint):
    """The encoders in bf16 (the GPU working dtype) stay close to fp32."""
    path = tiny_checkpoint("e")
    m32 = runner_for(path).model
    cfg = load_config(path)
    with torch.device("meta"):
        m16 = Gemma4Model(cfg)
    load_weights(m16, cfg, path, torch.bfloat16, torch.device("cpu"), progress=False)
    pix, pos = _two_images(48, torch.Generator().manual_seed(4))
    feats = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = m32.encode_image(pix[0], pos[0]), m16.encode_image(pix[0], pos[0])
        c, d = m32.encode_audio(feats), m16.encode_audio(feats)
    assert b.dtype == torch.bfloat16
    rel_img = ((a - b.float()).norm() / a.norm()).item()
    rel_aud = ((c - d.float()).norm() / c.norm()).item()
    print(f"[mm parity] bf16 vs fp32 relative error: image {rel_img:.3f}, audio {rel_aud:.3f}")
    assert rel_img < 0.05 and rel_aud < 0.05
