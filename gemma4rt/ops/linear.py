"""Linear layers (x · Wᵀ, W in the checkpoint's [out, in] layout). On CUDA, 1–8 rows of bf16/fp16 go
through the native skinny GEMM in csrc/gemm/gemv.cu (H200, batch-1 decode: E2B 4.19 -> 3.70 ms/token,
26B-A4B 6.32 -> 5.86 against cuBLAS; its CUDA-core kernel takes 1-2 rows, its tensor-core kernel 3-8, see
GEMMA4RT_GEMV_MMA there); GEMMA4RT_GEMV=0 turns it off. Everything else is torch's F.linear.
A start-up tuner that timed both kernels and cuBLAS per weight shape and kept the fastest was measured
slower in the decode graph than these fixed choices (H200: E2B 3.07 -> 3.44 ms, 31B 17.50 -> 17.76) and
was removed: a kernel timed alone is not the kernel in the step's chain."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from gemma4rt.ops import _native
from gemma4rt.ops.activation import gelu_tanh_and_mul, gelu_tanh_mul
from gemma4rt.ops.norm import norm_add_scale, norm_add_scale_norm, norm_add_scale_norm3
from gemma4rt.ops.rope import _f32, qkv_norm_rope_store

GEMV_MAX_ROWS = 8
GEMV_ENABLED = os.environ.get("GEMMA4RT_GEMV", "1") != "0"
# E2B/E4B's per-layer-input gate: by default its GEMV multiplies gelu(gate) by the per-layer input in its
# epilogue (linear_gelu_aux: one launch a layer less, the same bits); GEMMA4RT_FUSED_PLE_GATE=0 runs two launches.
FUSED_PLE_GATE = os.environ.get("GEMMA4RT_FUSED_PLE_GATE", "1") != "0"
# A 1-8-row projection followed by norm_add_scale[_norm] (o_proj, down_proj, the per-layer projection) runs by
# default as one launch whose last CTA does the norms (linear_norm_add_scale); GEMMA4RT_FUSED_GEMV_NORM=0: two.
# H200, batch-1 TPOT with both fusions on / off: E2B 3.36 / 3.78 ms, E4B 5.05 / 5.28, 12B 8.20 / 8.61.
FUSED_GEMV_NORM = os.environ.get("GEMMA4RT_FUSED_GEMV_NORM", "1") != "0"
# GEMMA4RT_FUSED_GEMV_NORM3=1: a MoE layer's 1-8-row o_proj runs with the three norms that open its MoE block in
# its last CTA (linear_norm_add_scale_norm3; one launch a 26B-A4B layer less at batch 1, the same bits). Off by
# default until it has run on a GPU (written when the session had no device time left).
FUSED_GEMV_NORM3 = os.environ.get("GEMMA4RT_FUSED_GEMV_NORM3", "0") == "1"
# GEMMA4RT_FUSED_QKV_ROPE=1: a 1-8-row q/k/v projection runs with the q/k norms, RoPE and the KV store done by
# each head's last CTA (linear_qkv_norm_rope_store): one launch a layer less at batch 1, the same bits. Off by
# default: it is still slower than the separate launch (H200, bench/kernels/gemv_chain.py, µs a layer fused /
# separate: E2B 49.6 / 48.0, E4B 75.8 / 75.1, 26B-A4B 50.1 / 49.2, 12B 142.1 / 141.2).
FUSED_QKV_ROPE = os.environ.get("GEMMA4RT_FUSED_QKV_ROPE", "0") == "1"
CUDA_CORES, TENSOR_CORES = 1, 2          # the gemv ops' `kernel` argument (0: by the row count)
# `kernel | W_STATIC`: w is a weight that no kernel still in flight writes, so the launch loads its first vectors
# before waiting on the previous kernel (PDL), overlapping their DRAM latency with it; the same bits. The linear*
# functions below take model weights and pass it. GEMMA4RT_GEMV_PRELOAD=0 turns the preload off.
W_STATIC = 4


def gemv_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dim() == 2 and w.dim() == 2 and 1 <= x.shape[0] <= GEMV_MAX_ROWS and _native.use_native(x, w) and
            x.dtype in _native.HALF_TYPES and w.dtype == x.dtype and x.shape[1] == w.shape[1] and
            x.shape[1] % 8 == 0 and x.stride(-1) == 1 and w.stride(-1) == 1 and x.stride(0) % 8 == 0 and
            w.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def gemv(x: torch.Tensor, w: torch.Tensor, kernel: int = 0) -> torch.Tensor:
    """The native skinny GEMM, unconditionally (callers check gemv_ok); kernel 0 the default choice."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    torch.ops.gemma4rt.gemv(x, w, out, kernel)
    return out


def gemv_gelu_mul(x: torch.Tensor, w_gate_up: torch.Tensor, kernel: int = 0) -> torch.Tensor:
    out = torch.empty(x.shape[0], w_gate_up.shape[0] // 2, dtype=x.dtype, device=x.device)
    torch.ops.gemma4rt.gemv_gelu_mul(x, w_gate_up, out, kernel)
    return out


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if GEMV_ENABLED and gemv_ok(x, w):
        return gemv(x, w, W_STATIC)
    return F.linear(x, w)


def linear_gelu_mul(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x · gateᵀ) · (x · upᵀ) for w_gate_up = [gate; up] ([2I, in]): one native kernel for 1–8 rows
    (no [rows, 2I] intermediate, one launch less per MLP), else the GEMM then gelu-and-mul."""
    if GEMV_ENABLED and gemv_ok(x, w_gate_up) and w_gate_up.shape[0] % 2 == 0:
        return gemv_gelu_mul(x, w_gate_up, W_STATIC)
    return gelu_tanh_and_mul(linear(x, w_gate_up))


def linear_gelu_aux(x: torch.Tensor, w: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x · wᵀ) · aux (aux [rows, out], e.g. a strided view): E2B/E4B's per-layer-input gate times the
    layer's per-layer input. One native launch for 1–8 rows, with the bits of the unfused ops (the GEMV's output
    rounded, then gelu_tanh_mul); else the GEMM then gelu_tanh_mul."""
    if (GEMV_ENABLED and FUSED_PLE_GATE and gemv_ok(x, w) and _native.has_op("gemv_gelu_aux") and aux.dim() == 2 and
            aux.shape == (x.shape[0], w.shape[0]) and aux.dtype == x.dtype and aux.device == x.device and
            aux.stride(-1) == 1):
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        torch.ops.gemma4rt.gemv_gelu_aux(x, w, aux, out, W_STATIC)
        return out
    return gelu_tanh_mul(linear(x, w), aux)


GEMV_COUNTER_SLOTS = 256     # gemv_norm counts in slot 0, gemv_qkv_norm_rope_store in one slot a head


def gemv_norm_counter(device) -> Optional[torch.Tensor]:
    """The device's CTA counters for gemv_norm and gemv_qkv_norm_rope_store launches (the launches of a stream
    run one after another, so they share them). Call before capturing CUDA graphs; None when first asked for
    during a capture (the unfused ops run then)."""
    return _native.zero_counters("gemv_norm", GEMV_COUNTER_SLOTS, device)


def _gemv_norm(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
               scale: Optional[torch.Tensor], norms: tuple, eps: float) -> Optional[tuple]:
    """(h, *rms_norm(h, n) for n in norms) with h = norm_add_scale(x · wᵀ, residual, weight, scale) from one
    gemv_norm launch (norms: up to three weights, the first may be None for none), or None when the launch
    cannot take these operands."""
    N = w.shape[0]
    if not (GEMV_ENABLED and gemv_ok(x, w) and _native.has_op("gemv_norm") and N % 8 == 0 and
            residual.dim() == 2 and residual.shape == (x.shape[0], N) and residual.dtype == x.dtype and
            residual.device == x.device and residual.stride(-1) == 1 and residual.stride(0) % 8 == 0 and
            residual.data_ptr() % 16 == 0 and weight is not None):
        return None
    counter = gemv_norm_counter(x.device)
    if counter is None:
        return None
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y)
    ws = [t.to(x.dtype).contiguous() for t in norms if t is not None]
    outs = [torch.empty_like(y) for _ in ws]
    more = []                        # w3, w4, normed3, normed4 (the op's trailing optional arguments)
    if len(ws) > 1:
        more = [ws[1], ws[2] if len(ws) > 2 else None, outs[1], outs[2] if len(ws) > 2 else None]
    sc = None if scale is None else scale.reshape(-1)[:1].float().contiguous()
    torch.ops.gemma4rt.gemv_norm(x, w, residual, weight.to(x.dtype).contiguous(), sc, ws[0] if ws else None,
                                 float(eps), y, h, outs[0] if outs else None, counter, W_STATIC, *more)
    return (h, *outs)


def linear_norm_add_scale(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          scale: Optional[torch.Tensor], weight2: Optional[torch.Tensor],
                          eps: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(h, rms_norm(h, weight2) or None) with h = norm_add_scale(x · wᵀ, residual, weight, scale): a projection
    and the norms after it. One native launch for 1–8 rows with FUSED_GEMV_NORM (the bits of the unfused ops),
    else linear then norm_add_scale[_norm]."""
    got = _gemv_norm(x, w, residual, weight, scale, (weight2,), eps) if FUSED_GEMV_NORM else None
    if got is not None:
        return got[0], (got[1] if weight2 is not None else None)
    y = linear(x, w)
    if weight2 is None:
        return norm_add_scale(y, residual, weight, scale, eps), None
    return norm_add_scale_norm(y, residual, weight, scale, weight2, eps)


def linear_norm_add_scale_norm3(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                scale: Optional[torch.Tensor], weight2: torch.Tensor, weight3: torch.Tensor,
                                weight4: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """(h, rms_norm(h, weight2), rms_norm(h, weight3), rms_norm(h, weight4)) with h = norm_add_scale(x · wᵀ,
    residual, weight, scale): a MoE layer's o_proj and the three norms that open its MoE block. One native launch
    for 1–8 rows with FUSED_GEMV_NORM3 (the bits of the unfused ops), else linear then norm_add_scale_norm3."""
    got = (_gemv_norm(x, w, residual, weight, scale, (weight2, weight3, weight4), eps)
           if FUSED_GEMV_NORM3 else None)
    if got is not None:
        return got
    return norm_add_scale_norm3(linear(x, w), residual, weight, scale, weight2, weight3, weight4, eps)


def linear_qkv_norm_rope_store(x: torch.Tensor, w_qkv: torch.Tensor, heads: int, head_dim: int,
                               q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], eps: float,
                               cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               slot_mapping: torch.Tensor) -> torch.Tensor:
    """A layer's fused q/k/v projection (w_qkv = [q; k; v], or [q; k] when V is K) and then
    qkv_norm_rope_store: returns the normed, rotated q [T, heads, head_dim] and stores the new k / v in the
    caches. One native launch for 1-8 rows with FUSED_QKV_ROPE (the bits of the two steps), else both."""
    T, D, KVH = x.shape[0], head_dim, k_cache.shape[2]
    k_eq_v = w_qkv.shape[0] == (heads + KVH) * D
    if (GEMV_ENABLED and FUSED_QKV_ROPE and gemv_ok(x, w_qkv) and _native.has_op("gemv_qkv_norm_rope_store") and
            D in (256, 512) and cos is not None and sin is not None and k_cache.dtype == v_cache.dtype == x.dtype and
            k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and
            (k_eq_v or w_qkv.shape[0] == (heads + 2 * KVH) * D) and w_qkv.shape[0] // D <= GEMV_COUNTER_SLOTS):
        counter = gemv_norm_counter(x.device)       # (shared with gemv_norm: a stream's launches run in turn)
        if counter is not None:
            y = torch.empty(T, w_qkv.shape[0], dtype=x.dtype, device=x.device)
            q = torch.empty(T, heads, D, dtype=x.dtype, device=x.device)
            ws = [None if t is None else t.to(x.dtype).contiguous() for t in (q_weight, k_weight)]
            torch.ops.gemma4rt.gemv_qkv_norm_rope_store(x, w_qkv, ws[0], ws[1], float(eps), _f32(cos), _f32(sin),
                                                        k_cache, v_cache, slot_mapping.to(torch.int64).contiguous(),
                                                        y, q, counter, W_STATIC)
            return q
    y = linear(x, w_qkv)
    q = y[:, :heads * D].view(T, heads, D)
    k = y[:, heads * D:(heads + KVH) * D].view(T, KVH, D)
    v = k if k_eq_v else y[:, (heads + KVH) * D:].view(T, KVH, D)
    return qkv_norm_rope_store(q, k, v, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, slot_mapping)
