"""ops: the Python face of csrc. Each op dispatches to gemma4rt._C when the extension is built and the
tensors live on a GPU, else to its PyTorch reference in ops/reference.py (the specification)."""
from gemma4rt.ops._native import NATIVE_AVAILABLE, use_native
from gemma4rt.ops.activation import gelu_tanh_and_mul, gelu_tanh_mul
from gemma4rt.ops.attention import paged_attention, store_kv
from gemma4rt.ops.linear import (linear, linear_gelu_aux, linear_gelu_mul, linear_norm_add_scale,
                                  linear_norm_add_scale_norm3, linear_qkv_norm_rope_store)
from gemma4rt.ops.moe import moe_experts, moe_route
from gemma4rt.ops.norm import (add_rms_norm, moe_block_end, norm_add_scale, norm_add_scale_norm,
                               norm_add_scale_norm3, rms_norm)
from gemma4rt.ops.rope import head_norm_rope, qkv_norm_rope_store, rope_cos_sin, rope_inv_freq
from gemma4rt.ops.sampling import sample_from_logits, softcap

__all__ = [
    "NATIVE_AVAILABLE", "use_native", "gelu_tanh_and_mul", "gelu_tanh_mul", "paged_attention", "store_kv",
    "moe_experts", "moe_route", "add_rms_norm", "norm_add_scale", "norm_add_scale_norm", "norm_add_scale_norm3",
    "moe_block_end", "rms_norm",
    "head_norm_rope", "qkv_norm_rope_store", "linear", "linear_gelu_aux", "linear_gelu_mul", "linear_norm_add_scale",
    "linear_norm_add_scale_norm3", "linear_qkv_norm_rope_store",
    "rope_cos_sin", "rope_inv_freq", "sample_from_logits", "softcap",
]
