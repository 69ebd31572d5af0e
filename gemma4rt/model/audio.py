"""Gemma 4 audio conformer (E2B/E4B, gemma4-architecture.md §5) and its `embed_audio` projection.

Parameter names equal the checkpoint names below `model.audio_tower.`. Plain torch ops in the model dtype;
the attention runs in fp32 like the reference. The chunked local attention is computed with the dense
formula of §5.2 (equal to HF's blocked form when chunk = context_left − 1 − context_right):

    logit(i, j) = q_i·k_j + q_i·R(i − j),  capped 50·tanh(·/50),  allowed iff 0 ≤ i − j < context_left − 1
    and frame j valid (masked logits = −1e9).

Input of one clip: `input_features [T, M]` (log-mel, M = subsampling_conv_channels[0]) and
`input_features_mask [T]` (True = valid frame). Output: `[n_soft, output_proj_dims]` for the valid frames
after the two stride-2 subsamplings.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gemma4rt.model.vision import ClippableLinear, Norm, PlainLinear, _param, rms_norm


def _act(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported audio activation {name!r}")


class _Conv(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.weight = _param(*shape)


class SubsampleLayer(nn.Module):
    """Conv2d(k=3, s=2, p=1, no bias) over (time, freq) → LayerNorm over channels (weight only) → ReLU."""

    def __init__(self, c_in: int, c_out: int, eps: float):
        super().__init__()
        self.conv = _Conv(c_out, c_in, 3, 3)
        self.norm = Norm(c_out)
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        x = x * mask[None, None, :, None].to(x.dtype)                  # x [1, C, T, F]
        x = F.conv2d(x.to(self.conv.weight.dtype), self.conv.weight, stride=2, padding=1)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.norm.weight, None, self.eps)
        return F.relu(x).permute(0, 3, 1, 2), mask[::2]


class SubsampleConvProjection(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        c0, c1 = cfg["subsampling_conv_channels"]
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.layer0 = SubsampleLayer(1, c0, eps)
        self.layer1 = SubsampleLayer(c0, c1, eps)
        self.input_proj_linear = PlainLinear((c0 // 4) * c1, cfg["hidden_size"])

    def forward(self, feats: torch.Tensor, mask: torch.Tensor):
        x, mask = self.layer0(feats[None, None], mask)
        x, mask = self.layer1(x, mask)
        x = x[0].permute(1, 2, 0).reshape(x.shape[2], -1)                 # [T', F'·C], channel fastest
        return self.input_proj_linear(x), mask


class FeedForward(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D, clip = cfg["hidden_size"], bool(cfg.get("use_clipped_linears", True))
        self.ffw_layer_1 = ClippableLinear(D, 4 * D, clip)
        self.ffw_layer_2 = ClippableLinear(4 * D, D, clip)
        self.pre_layer_norm = Norm(D)
        self.post_layer_norm = Norm(D)
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.weight = float(cfg.get("residual_weight", 0.5))
        self.act = _act(cfg.get("hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffw_layer_2(self.act(self.ffw_layer_1(rms_norm(x, self.pre_layer_norm.weight, self.eps))))
        return x + rms_norm(h, self.post_layer_norm.weight, self.eps) * self.weight


class AudioAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D, H = cfg["hidden_size"], cfg["num_attention_heads"]
        clip = bool(cfg.get("use_clipped_linears", True))
        self.H, self.hd = H, D // H
        self.q_proj = ClippableLinear(D, D, clip)
        self.k_proj = ClippableLinear(D, D, clip)
        self.v_proj = ClippableLinear(D, D, clip)
        self.post = ClippableLinear(D, D, clip)
        self.relative_k_proj = PlainLinear(D, D)
        self.per_dim_scale = _param(self.hd)
        self.cap = float(cfg.get("attention_logit_cap", 50.0))
        self.invalid = float(cfg.get("attention_invalid_logits_value", -1e9))
        self.left = int(cfg.get("attention_context_left", 13)) - 1            # keys i−j in [0, left)
        self.right = int(cfg.get("attention_context_right", 0))
        self.num_timescales = D // 2

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        T, H, hd = x.shape[0], self.H, self.hd
        q = self.q_proj(x).float().view(T, H, hd)
        k = self.k_proj(x).float().view(T, H, hd)
        v = self.v_proj(x).float().view(T, H, hd)
        q = q * ((hd ** -0.5) / math.log(2)) * F.softplus(self.per_dim_scale.float())
        k = k * (math.log(1 + math.e) / math.log(2))
        # relative position table R(δ) for δ = −right … left−1 (δ = i − j)
        deltas = torch.arange(-self.right, self.left, device=x.device)
        n = self.num_timescales
        inv = torch.exp(torch.arange(n, dtype=torch.float32, device=x.device) * -(math.log(10000.0) / max(n - 1, 1)))
        ang = deltas[:, None].float() * inv
        pe = torch.cat([ang.sin(), ang.cos()], dim=-1).to(x.dtype)
        R = self.relative_k_proj(pe).float().view(-1, H, hd)                 # [n_δ, H, hd]
        ac = torch.einsum("ihd,jhd->hij", q, k)
        qr = torch.einsum("ihd,rhd->hir", q, R)                             # [H, T, n_δ]
        i = torch.arange(T, device=x.device)
        delta = i[:, None] - i[None, :]                                      # [T, T]
        allowed = (delta < self.left) & (delta >= -self.right) & valid[None, :]
        if self.right == 0:
            allowed = allowed & (delta >= 0)
        idx = (delta + self.right).clamp(0, R.shape[0] - 1)
        bd = torch.gather(qr, 2, idx[None].expand(H, T, T))
        s = ac + bd
        s = torch.tanh(s / self.cap) * self.cap
        s = s.masked_fill(~allowed[None], self.invalid)
        p = torch.softmax(s, dim=-1)
        o = torch.einsum("hij,jhd->ihd", p, v).reshape(T, -1)
        return self.post(o.to(x.dtype))


class LightConv(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D, clip = cfg["hidden_size"], bool(cfg.get("use_clipped_linears", True))
        self.linear_start = ClippableLinear(D, 2 * D, clip)
        self.linear_end = ClippableLinear(D, D, clip)
        self.kernel = int(cfg.get("conv_kernel_size", 5))
        self.depthwise_conv1d = _Conv(D, 1, self.kernel)
        self.pre_layer_norm = Norm(D)
        self.conv_norm = Norm(D)
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.act = _act(cfg.get("hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(rms_norm(x, self.pre_layer_norm.weight, self.eps)), dim=-1)
        h = F.pad(h.t()[None], (self.kernel - 1, 0))                          # causal: left pad k−1
        h = F.conv1d(h, self.depthwise_conv1d.weight, groups=h.shape[1])[0].t()
        h = self.act(rms_norm(h, self.conv_norm.weight, self.eps))
        return x + self.linear_end(h)


class ConformerLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D = cfg["hidden_size"]
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.feed_forward1 = FeedForward(cfg)
        self.feed_forward2 = FeedForward(cfg)
        self.self_attn = AudioAttention(cfg)
        self.lconv1d = LightConv(cfg)
        self.norm_pre_attn = Norm(D)
        self.norm_post_attn = Norm(D)
        self.norm_out = Norm(D)
        self.clip = float(cfg.get("gradient_clipping", 1e10))

    def _clamp(self, x: torch.Tensor) -> torch.Tensor:
        c = min(self.clip, torch.finfo(x.dtype).max)
        return torch.clamp(x, -c, c)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.feed_forward1(x)
        a = self.self_attn(rms_norm(self._clamp(x), self.norm_pre_attn.weight, self.eps), valid)
        x = x + rms_norm(self._clamp(a), self.norm_post_attn.weight, self.eps)
        x = self.lconv1d(x)
        x = self.feed_forward2(x)
        return rms_norm(self._clamp(x), self.norm_out.weight, self.eps)


class AudioTower(nn.Module):
    """`model.audio_tower`: log-mel frames → encoder outputs of the valid subsampled frames."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.subsample_conv_projection = SubsampleConvProjection(cfg)
        self.layers = nn.ModuleList([ConformerLayer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.output_proj = PlainLinear(cfg["hidden_size"], cfg.get("output_proj_dims", 1536), bias=True)

    def forward(self, input_features: torch.Tensor, input_features_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_features [T, M], input_features_mask [T] bool → [n_valid, output_proj_dims]."""
        if input_features_mask is None:
            input_features_mask = torch.ones(input_features.shape[0], dtype=torch.bool, device=input_features.device)
        x, valid = self.subsample_conv_projection(input_features, input_features_mask.bool())
        for layer in self.layers:
            x = layer(x, valid)
        return self.output_proj(x)[valid]


def num_audio_soft_tokens(input_features_mask: torch.Tensor) -> int:
    """Valid frames after the two stride-2 subsamplings (what the encoder keeps)."""
    return int(input_features_mask.bool()[::2][::2].sum())


__all__ = ["AudioTower", "num_audio_soft_tokens"]
