"""Tensor parallelism of the text decoder (Megatron style).

Rank r of N holds query heads [r·H/N, (r+1)·H/N) and the KV heads they read (KVH/N of them when N
divides KVH; the one KV head its query heads share when KVH divides N, replicated on N/KVH ranks), the
matching input columns of o_proj, 1/N of every MLP's and every expert's intermediate rows (gate and up)
and columns (down). The residual stream, norms, router, embeddings, per-layer embeddings, LM head and
the vision/audio encoders are replicated; the partial outputs of o_proj, the MLP and the experts are
summed across ranks (one all-reduce each) before the norms that follow them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class TP:
    rank: int = 0
    size: int = 1
    group: Any = None         # torch.distributed process group of the forward pass's all-reduces
    ctrl: Any = None          # a CPU (gloo) group (start-up agreement; the step messages when pipe is None)
    pipe: Any = None          # rank 0: a list of connections to ranks 1..N-1; others: the one from rank 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist
            dist.all_reduce(x, group=self.group)
        return x

    def part(self, n: int) -> tuple[int, int]:
        """(start, count) of this rank's share of n rows (n divisible by size)."""
        c = n // self.size
        return self.rank * c, c

    def kv_heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """(first, count) of the KV heads this rank's query heads read."""
        if num_kv_heads % self.size == 0:
            return self.part(num_kv_heads)
        group = num_heads // num_kv_heads
        return (self.rank * (num_heads // self.size)) // group, 1


NO_TP = TP()


def check_tp(text, size: int) -> Optional[str]:
    """Why `size` ranks cannot split this text config (None when they can)."""
    if size < 1:
        return f"--tp must be at least 1, got {size}"
    if size == 1:
        return None
    if text.num_heads % size:
        return f"--tp {size} does not divide the {text.num_heads} attention heads"
    for l in text.layers:
        kvh = l.num_kv_heads
        if kvh % size and size % kvh:
            return f"--tp {size}: layer {l.index} has {kvh} KV heads (neither divides the other)"
        if l.intermediate_size % size:
            return f"--tp {size} does not divide layer {l.index}'s MLP width {l.intermediate_size}"
    if text.enable_moe_block and text.moe_intermediate_size % size:
        return f"--tp {size} does not divide the experts' width {text.moe_intermediate_size}"
    return None


_LAYER = re.compile(r"^language_model\.layers\.(\d+)\.(.+)$")


def shard(name: str, t: torch.Tensor, text, tp: TP) -> torch.Tensor:
    """This rank's slice of the full checkpoint tensor `t` of parameter `name` (ours, not HF's)."""
    if tp.size == 1:
        return t
    m = _LAYER.match(name)
    if m is None:
        return t
    spec = text.layers[int(m.group(1))]
    tail = m.group(2)
    D = spec.head_dim
    if tail == "self_attn.q_proj.weight":
        s, c = tp.part(text.num_heads)
        return t[s * D:(s + c) * D]
    if tail in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        s, c = tp.kv_heads(text.num_heads, spec.num_kv_heads)
        return t[s * D:(s + c) * D]
    if tail == "self_attn.o_proj.weight":
        s, c = tp.part(text.num_heads)
        return t[:, s * D:(s + c) * D]
    if tail in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        s, c = tp.part(t.shape[0])
        return t[s:s + c]
    if tail == "mlp.down_proj.weight":
        s, c = tp.part(t.shape[1])
        return t[:, s:s + c]
    if tail == "experts.gate_up_proj":            # [E, 2I, d]: gate rows, then up rows
        inter = t.shape[1] // 2
        s, c = tp.part(inter)
        return torch.cat([t[:, s:s + c], t[:, inter + s:inter + s + c]], 1)
    if tail == "experts.down_proj":               # [E, d, I]
        s, c = tp.part(t.shape[2])
        return t[:, :, s:s + c]
    return t
