"""Encoder-free multimodal embedders of the unified 12B (gemma4-architecture.md §6.2–§6.3).

Vision (`model.vision_embedder.*` in checkpoints): merged model patches p [N, (k·p)²·3] in [0, 1] with
merged-grid positions (x, y) (−1 = padding):

    h = LN_pos( LN_2(patch_dense(LN_1(p))) + (P[x, 0] + P[y, 1])·valid )     LayerNorm eps 1e-5 (torch default)
    soft = embed_vision(h) = embedding_projection · RMSNorm_noscale(h)

Audio: raw 16 kHz samples cut into frames of `audio_embed_dim` (640) samples; soft = embed_audio(frame).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma4rt.model.vision import PlainLinear, _param

LN_EPS = 1e-5


class LayerNorm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = _param(n)
        self.bias = _param(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, LN_EPS)


class UnifiedVisionEmbedder(nn.Module):
    """`vision_embedder`: merged patches → [n_valid, mm_embed_dim] (before `embed_vision`)."""

    def __init__(self, cfg: dict):
        super().__init__()
        mp = int(cfg.get("patch_size", 16)) * int(cfg.get("pooling_kernel_size", 3))
        n_in = mp * mp * 3
        D = int(cfg.get("mm_embed_dim", 3840))
        self.patch_ln1 = LayerNorm(n_in)
        self.patch_dense = PlainLinear(n_in, D, bias=True)
        self.patch_ln2 = LayerNorm(D)
        self.pos_embedding = _param(int(cfg.get("mm_posemb_size", 1120)), 2, D)
        self.pos_norm = LayerNorm(D)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, (k·p)²·3], position_ids [N, 2] → [n_valid, D] (padding rows dropped)."""
        w = self.patch_dense.weight
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(pixel_values.to(w.dtype))))
        pos = position_ids.long()
        valid = (pos != -1).all(dim=-1)
        pc = pos.clamp(min=0)
        pe = self.pos_embedding[pc[:, 0], 0] + self.pos_embedding[pc[:, 1], 1]
        h = h + pe * valid[:, None].to(pe.dtype)
        return self.pos_norm(h)[valid]


def audio_frames(waveform: torch.Tensor, samples_per_token: int) -> torch.Tensor:
    """Raw samples [S] → frames [ceil(S / n), n], the last one zero-padded."""
    pad = (-waveform.shape[0]) % samples_per_token
    if pad:
        waveform = F.pad(waveform, (0, pad))
    return waveform.view(-1, samples_per_token)


__all__ = ["UnifiedVisionEmbedder", "audio_frames"]
