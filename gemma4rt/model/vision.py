"""Gemma 4 vision tower (gemma4-architecture.md §4): the on-device ViT (E2B/E4B, clipped linears) and the
large ViT (31B/26B-A4B, standardize), plus the `embed_vision` projection into text space.

Parameter names equal the checkpoint names below `model.vision_tower.` / `model.embed_vision.`, so the
loader maps them one to one. The encoders are plain torch (not in the kernel families): computed in the
model dtype, with fp32 where the reference does (norms, softmax, pooling scale, standardize).

Input of one image: `pixel_values [N, 3·p²]` in [0, 1] (patch vectors laid out (row, col, channel)) and
`position_ids [N, 2]` = (x = column, y = row) of each patch, −1 for padding patches (optional).
Output: `[n_soft, D]` pooled soft tokens (padding cells dropped), n_soft = real patches / k².
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape), requires_grad=False)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """HF Gemma4RMSNorm: x·(mean(x²)+eps)^−½ (·w), computed in fp32, returned in x.dtype."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class Norm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = _param(n)


class PlainLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool = False):
        super().__init__()
        self.weight = _param(n_out, n_in)
        if bias:
            self.bias = _param(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, getattr(self, "bias", None))


class ClippableLinear(nn.Module):
    """`linear.weight` [out, in]; with clipping, scalar bounds clamp the input and the output."""

    def __init__(self, n_in: int, n_out: int, clipped: bool):
        super().__init__()
        self.linear = PlainLinear(n_in, n_out)
        self.clipped = clipped
        if clipped:
            self.input_min = _param()
            self.input_max = _param()
            self.output_min = _param()
            self.output_max = _param()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min.to(x.dtype), self.input_max.to(x.dtype))
        y = self.linear(x)
        if self.clipped:
            y = torch.clamp(y, self.output_min.to(y.dtype), self.output_max.to(y.dtype))
        return y


class MultimodalEmbedder(nn.Module):
    """`embed_vision` / `embed_audio`: weightless RMSNorm, then `embedding_projection` [d, D_mm]."""

    def __init__(self, n_in: int, d: int, eps: float):
        super().__init__()
        self.embedding_projection = PlainLinear(n_in, d)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.embedding_projection.weight
        return F.linear(rms_norm(x.to(w.dtype), None, self.eps), w)


def axial_rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D axial RoPE tables for positions pos [N, 2] (x, y): cos, sin [N, head_dim] fp32 laid out
    [x-half | y-half], each half in rotate-half form with frequencies θ^(−2i/(head_dim/2))."""
    half = head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=pos.device) / half))
    f = pos.float()[..., None] * inv                      # [N, 2, half/2]
    fx, fy = f[..., 0, :], f[..., 1, :]
    ang = torch.cat([fx, fx, fy, fy], dim=-1)             # [N, head_dim]
    return ang.cos(), ang.sin()


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, Dh]: rotate-half RoPE applied separately to the first and second halves."""
    half = x.shape[-1] // 2
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    out = []
    for i in range(2):
        xp = x[..., i * half:(i + 1) * half]
        cp, sp = c[..., i * half:(i + 1) * half], s[..., i * half:(i + 1) * half]
        x1, x2 = xp[..., : half // 2], xp[..., half // 2:]
        out.append(xp * cp + torch.cat([-x2, x1], dim=-1) * sp)
    return torch.cat(out, dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D, H, KVH, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        clip = bool(cfg.get("use_clipped_linears", False))
        self.H, self.KVH, self.hd = H, KVH, hd
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.q_proj = ClippableLinear(D, H * hd, clip)
        self.k_proj = ClippableLinear(D, KVH * hd, clip)
        self.v_proj = ClippableLinear(D, KVH * hd, clip)
        self.o_proj = ClippableLinear(H * hd, D, clip)
        self.q_norm = Norm(hd)
        self.k_norm = Norm(hd)

    def forward(self, x: torch.Tensor, cos, sin, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        N = x.shape[0]
        q = apply_axial_rope(rms_norm(self.q_proj(x).view(N, self.H, self.hd), self.q_norm.weight, self.eps), cos, sin)
        k = apply_axial_rope(rms_norm(self.k_proj(x).view(N, self.KVH, self.hd), self.k_norm.weight, self.eps), cos, sin)
        v = rms_norm(self.v_proj(x).view(N, self.KVH, self.hd), None, self.eps)
        if self.KVH != self.H:
            k = k.repeat_interleave(self.H // self.KVH, dim=1)
            v = v.repeat_interleave(self.H // self.KVH, dim=1)
        mask = key_mask[None, None, :] if key_mask is not None else None     # padding keys masked
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask, scale=1.0)          # [1, H, N, hd], fp32 softmax
        return self.o_proj(o[0].transpose(0, 1).reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D, I = cfg["hidden_size"], cfg["intermediate_size"]
        clip = bool(cfg.get("use_clipped_linears", False))
        self.gate_proj = ClippableLinear(D, I, clip)
        self.up_proj = ClippableLinear(D, I, clip)
        self.down_proj = ClippableLinear(I, D, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D = cfg["hidden_size"]
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = Norm(D)
        self.post_attention_layernorm = Norm(D)
        self.pre_feedforward_layernorm = Norm(D)
        self.post_feedforward_layernorm = Norm(D)

    def forward(self, x, cos, sin, key_mask):
        eps = self.eps
        a = self.self_attn(rms_norm(x, self.input_layernorm.weight, eps), cos, sin, key_mask)
        x = x + rms_norm(a, self.post_attention_layernorm.weight, eps)
        m = self.mlp(rms_norm(x, self.pre_feedforward_layernorm.weight, eps))
        return x + rms_norm(m, self.post_feedforward_layernorm.weight, eps)


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D, p = cfg["hidden_size"], cfg["patch_size"]
        self.input_proj = PlainLinear(3 * p * p, D)
        self.position_embedding_table = _param(2, cfg.get("position_embedding_size", 10240), D)

    def forward(self, pixels: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        w = self.input_proj.weight
        h = F.linear((2 * (pixels - 0.5)).to(w.dtype), w)
        pc = pos.clamp(min=0)
        t = self.position_embedding_table
        pe = F.embedding(pc[:, 0], t[0]) + F.embedding(pc[:, 1], t[1])
        return h + torch.where(pad[:, None], torch.zeros((), dtype=pe.dtype, device=pe.device), pe)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.ModuleList([VisionEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])


class VisionTower(nn.Module):
    """`model.vision_tower`: patches → soft tokens [n_soft, D] (before `embed_vision`)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        D = cfg["hidden_size"]
        self.head_dim = cfg["head_dim"]
        self.k = int(cfg.get("pooling_kernel_size", 3))
        self.theta = float((cfg.get("rope_parameters") or {}).get("rope_theta", 100.0))
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = VisionEncoder(cfg)
        self.standardize = bool(cfg.get("standardize", False))
        if self.standardize:
            self.std_bias = _param(D)
            self.std_scale = _param(D)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3p²], position_ids [N, 2] (−1 rows = padding) → [n_soft, D]."""
        pos = position_ids.long()
        pad = (pos == -1).all(dim=-1)
        x = self.patch_embedder(pixel_values, pos, pad)
        cos, sin = axial_rope_cos_sin(pos, self.head_dim, self.theta)
        key_mask = ~pad if bool(pad.any()) else None
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, key_mask)
        return self.pool(x, pos, pad)

    def pool(self, x: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """k×k average of the patch grid (padding zeroed, empty cells dropped), ×√D in fp32,
        standardize, cast to the model dtype."""
        k = self.k
        x = x.masked_fill(pad[:, None], 0.0)
        pc = pos.clamp(min=0)
        grid_w = int(pc[:, 0].max()) + 1
        cell = torch.div(pc[:, 0], k, rounding_mode="floor") + (grid_w // k) * torch.div(pc[:, 1], k, rounding_mode="floor")
        n_cells = max(x.shape[0] // (k * k), int(cell.max()) + 1)
        pooled = torch.zeros(n_cells, x.shape[1], dtype=torch.float32, device=x.device)
        pooled.index_add_(0, cell, x.float() / (k * k))
        hit = torch.zeros(n_cells, dtype=torch.bool, device=x.device)
        hit[cell[~pad]] = True
        h = pooled.to(x.dtype)[hit].float() * math.sqrt(x.shape[1])
        if self.standardize:
            h = (h - self.std_bias.float()) * self.std_scale.float()
        return h.to(x.dtype)


def num_image_soft_tokens(position_ids: torch.Tensor, k: int) -> int:
    """Soft tokens an image yields: real patches / k²."""
    return int((position_ids != -1).all(dim=-1).sum()) // (k * k)


__all__ = ["VisionTower", "MultimodalEmbedder", "ClippableLinear", "rms_norm", "num_image_soft_tokens"]
