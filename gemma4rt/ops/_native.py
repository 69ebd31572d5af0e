"""Loads the native extension gemma4rt._C when it was built, and says whether an op may use it."""
from __future__ import annotations

import os
from typing import Optional

import torch

try:  # pragma: no cover - depends on the build
    if os.environ.get("GEMMA4RT_DISABLE_NATIVE", "0") == "1":
        raise ImportError("disabled by GEMMA4RT_DISABLE_NATIVE=1")
    from gemma4rt import _C  # noqa: F401  (registers torch.ops.gemma4rt.*)
    NATIVE_AVAILABLE = True
except ImportError:
    NATIVE_AVAILABLE = False

# Every native op is an out-variant returning nothing: its fake (meta) kernel does nothing, which
# lets torch.compile / opcheck trace them.
OPS = ("rms_norm", "add_rms_norm", "norm_add_scale", "norm_add_scale_norm", "norm_add_scale_norm3", "moe_block_end",
       "head_norm_rope", "qkv_norm_rope_store", "gelu_tanh_and_mul", "gelu_tanh_mul", "gemv", "gemv_gelu_mul",
       "gemv_gelu_aux", "gemv_norm", "gemv_qkv_norm_rope_store", "store_kv", "paged_attention", "moe_route",
       "moe_align", "moe_experts", "sample")

# Ops a ROCm build leaves out (their kernels use NVIDIA-only tensor-core / async-copy / cluster
# instructions); there they run their PyTorch references.
CUDA_ONLY_OPS = ("paged_attention", "moe_experts", "sample")
BUILT_OPS = frozenset(n for n in OPS if NATIVE_AVAILABLE and not (torch.version.hip and n in CUDA_ONLY_OPS))

if NATIVE_AVAILABLE:  # pragma: no cover - depends on the build
    def _fake(*args, **kwargs):
        return None

    for _name in BUILT_OPS:
        torch.library.register_fake(f"gemma4rt::{_name}")(_fake)


def has_op(name: str) -> bool:
    """Whether the loaded extension has this op (a ROCm build lacks CUDA_ONLY_OPS)."""
    return name in BUILT_OPS


HALF_TYPES = (torch.float16, torch.bfloat16)
FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_native(*tensors: torch.Tensor) -> bool:
    """True when the extension is loaded and every tensor lives on a CUDA/ROCm device."""
    return NATIVE_AVAILABLE and all(t.is_cuda for t in tensors if t is not None)


def rows2d(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> a [rows, n] view (copying only when no such view exists) with unit last stride."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


_COUNTERS: dict = {}


def zero_counters(name: str, n: int, device) -> Optional[torch.Tensor]:
    """A per-device int32 buffer of n zeros for the kernels that count their CTAs in it (each count resets
    itself, so the buffer stays zero between launches), one per name. Made on first use; None when first asked
    for during CUDA-graph capture (made then, it would live in the graph's memory pool): callers fall back to
    a path without it, and graph capture makes the buffers first."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    buf = _COUNTERS.get((name, device))
    if buf is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        buf = _COUNTERS[(name, device)] = torch.zeros(n, dtype=torch.int32, device=device)
    return buf
