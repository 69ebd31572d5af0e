"""The Gemma 4 text decoder (gemma4-architecture.md §3) over a paged KV cache.

Parameters carry the Hugging Face names (without the `model.language_model.` / `model.` prefix) so
the loader maps checkpoint keys one to one. All math goes through gemma4rt.ops.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gemma4rt import ops
from gemma4rt.model.context import ForwardContext
from gemma4rt.model.parallel import NO_TP, TP
from gemma4rt.model_config import FULL, SLIDING, LayerSpec, TextConfig

# A MoE block's norms in two launches (norm_add_scale_norm3, moe_block_end) instead of seven; =0 for the
# separate ops (an A/B switch for the benchmarks; the same bits either way, tests/gpu checks it).
FUSED_MOE_NORMS = os.environ.get("GEMMA4RT_FUSED_MOE_NORMS", "1") != "0"


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """A bias-free linear layer holding `weight` [out, in] (HF layout)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = _param(n_out, n_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)


class Norm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = _param(n)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec, tp: TP = NO_TP):
        super().__init__()
        # this rank's query heads and the KV heads they read (model/parallel.py)
        d, D = cfg.hidden_size, spec.head_dim
        H = tp.part(cfg.num_heads)[1]
        KVH = tp.kv_heads(cfg.num_heads, spec.num_kv_heads)[1]
        self.spec = spec
        self.tp = tp
        self.num_kv_heads = KVH
        self.q_proj = Linear(d, H * D)
        self.q_norm = Norm(D)
        self.o_proj = Linear(H * D, d)
        if not spec.kv_shared:
            self.k_proj = Linear(d, KVH * D)
            self.k_norm = Norm(D)
            if not spec.k_eq_v:
                self.v_proj = Linear(d, KVH * D)

    def fuse(self) -> None:
        """Replace q/k/v projections by one [q|k|v] matrix (one GEMM per layer)."""
        if self.spec.kv_shared or hasattr(self, "qkv_proj"):
            return
        parts = [self.q_proj.weight, self.k_proj.weight] + ([] if self.spec.k_eq_v else [self.v_proj.weight])
        self.qkv_proj = Linear(1, 1)
        self.qkv_proj.weight = nn.Parameter(torch.cat(parts, 0), requires_grad=False)
        self.split = [p.shape[0] for p in parts]
        del self.q_proj, self.k_proj
        if not self.spec.k_eq_v:
            del self.v_proj

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cos: torch.Tensor, sin: torch.Tensor,
                eps: float, sliding_window: Optional[int], block_ids: Optional[torch.Tensor],
                project: bool = True) -> torch.Tensor:
        """project=False (one rank): the attention output before o_proj, [T, H·D]."""
        spec = self.spec
        T = x.shape[0]
        D, KVH = spec.head_dim, self.num_kv_heads
        pool_name = "sliding" if spec.is_sliding else "full"
        pool = ctx.kv[pool_name]
        src = spec.kv_source
        slot = pool.layer_slot[src]
        k_cache, v_cache = pool.k[slot], pool.v[slot]
        if hasattr(self, "qkv_proj"):
            # the [q|k|v] projection and the q/k norms, RoPE and KV store (one launch where the skinny GEMM takes it)
            q = ops.linear_qkv_norm_rope_store(x, self.qkv_proj.weight, self.split[0] // D, D, self.q_norm.weight,
                                               self.k_norm.weight, eps, cos, sin, k_cache, v_cache,
                                               ctx.slot_mappings[pool_name])
        elif spec.kv_shared:
            q = ops.head_norm_rope(self.q_proj(x).view(T, -1, D), self.q_norm.weight, eps, cos, sin)
        else:
            k_raw = self.k_proj(x).view(T, KVH, D)
            v_raw = k_raw if spec.k_eq_v else self.v_proj(x).view(T, KVH, D)
            q = ops.qkv_norm_rope_store(self.q_proj(x).view(T, -1, D), k_raw, v_raw, self.q_norm.weight,
                                        self.k_norm.weight, eps, cos, sin, k_cache, v_cache,
                                        ctx.slot_mappings[pool_name])
        o = ops.paged_attention(q, k_cache, v_cache, ctx.page_tables[pool_name], ctx.cu_seqlens_q,
                                ctx.seq_lens, sliding_window, block_ids, 1.0, zero_out=ctx.zero_attn_out,
                                mixed=ctx.mixed_attn)
        if not project:
            return o.reshape(T, -1)
        return self.tp.all_reduce(self.o_proj(o.reshape(T, -1)))


class MLP(nn.Module):
    def __init__(self, d: int, inter: int, tp: TP = NO_TP):
        super().__init__()
        self.tp = tp
        inter = tp.part(inter)[1]
        self.gate_proj = Linear(d, inter)
        self.up_proj = Linear(d, inter)
        self.down_proj = Linear(inter, d)

    def fuse(self) -> None:
        """Replace gate/up by one [gate|up] matrix (one GEMM, then the fused gelu-and-mul)."""
        if hasattr(self, "gate_up_proj"):
            return
        self.gate_up_proj = Linear(1, 1)
        self.gate_up_proj.weight = nn.Parameter(torch.cat([self.gate_proj.weight, self.up_proj.weight], 0),
                                                requires_grad=False)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        """project=False (one rank): the activations before down_proj."""
        if hasattr(self, "gate_up_proj"):
            act = ops.linear_gelu_mul(x, self.gate_up_proj.weight)
        else:
            act = ops.gelu_tanh_and_mul(torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1))
        return act if not project else self.tp.all_reduce(self.down_proj(act))


class Router(nn.Module):
    def __init__(self, d: int, num_experts: int):
        super().__init__()
        self.proj = Linear(d, num_experts)
        self.scale = _param(d)
        self.per_expert_scale = _param(num_experts)


class Experts(nn.Module):
    def __init__(self, d: int, num_experts: int, inter: int):
        super().__init__()
        self.gate_up_proj = _param(num_experts, 2 * inter, d)
        self.down_proj = _param(num_experts, d, inter)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec, tp: TP = NO_TP):
        super().__init__()
        d = cfg.hidden_size
        self.spec = spec
        self.cfg = cfg
        self.tp = tp
        self.self_attn = Attention(cfg, spec, tp)
        self.mlp = MLP(d, spec.intermediate_size, tp)
        self.input_layernorm = Norm(d)
        self.post_attention_layernorm = Norm(d)
        self.pre_feedforward_layernorm = Norm(d)
        self.post_feedforward_layernorm = Norm(d)
        self.layer_scalar = _param(1)
        if cfg.has_ple:
            P = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = Linear(d, P)
            self.per_layer_projection = Linear(P, d)
            self.post_per_layer_input_norm = Norm(d)
        if cfg.enable_moe_block:
            self.router = Router(d, cfg.num_experts)
            self.experts = Experts(d, cfg.num_experts, tp.part(cfg.moe_intermediate_size)[1])
            self.post_feedforward_layernorm_1 = Norm(d)
            self.post_feedforward_layernorm_2 = Norm(d)
            self.pre_feedforward_layernorm_2 = Norm(d)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cos, sin, ple: Optional[torch.Tensor],
                block_ids: Optional[torch.Tensor], a: Optional[torch.Tensor] = None,
                next_norm: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: the residual stream; a: its input norm when the previous layer already computed it.
        Returns (x, rms_norm(x, next_norm)): the next block's opening norm comes out of this layer's
        last kernel; (x, None) without next_norm."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        window = cfg.sliding_window if self.spec.is_sliding else None
        if a is None:
            a = ops.rms_norm(x, self.input_layernorm.weight, eps)
        fused = cfg.enable_moe_block and FUSED_MOE_NORMS
        # one rank: a projection and the norms after it go through ops.linear_norm_add_scale (one launch where
        # the native skinny GEMM takes it); with --tp the projection's all-reduce sits between them
        one = self.tp.size == 1
        sw_ids = block_ids if self.spec.is_sliding else None
        if one:
            o = self.self_attn(a, ctx, cos, sin, eps, window, sw_ids, project=False)
            if fused:       # o_proj and the MoE block's three opening norms (as below), one launch where it can
                x, u, z, v = ops.linear_norm_add_scale_norm3(
                    o, self.self_attn.o_proj.weight, x, self.post_attention_layernorm.weight, None,
                    self.pre_feedforward_layernorm.weight, self._router_norm_weight(),
                    self.pre_feedforward_layernorm_2.weight, eps)
            else:
                x, u = ops.linear_norm_add_scale(o, self.self_attn.o_proj.weight, x,
                                                 self.post_attention_layernorm.weight, None,
                                                 self.pre_feedforward_layernorm.weight, eps)
        else:
            a = self.self_attn(a, ctx, cos, sin, eps, window, sw_ids)
            if fused:
                # the MoE block's three opening norms of the new residual stream in the same launch: the shared
                # MLP's, the router's (weightless norm × scale × d^-½, as one weighted norm) and the experts'
                x, u, z, v = ops.norm_add_scale_norm3(a, x, self.post_attention_layernorm.weight, None,
                                                      self.pre_feedforward_layernorm.weight,
                                                      self._router_norm_weight(),
                                                      self.pre_feedforward_layernorm_2.weight, eps)
            else:
                x, u = ops.norm_add_scale_norm(a, x, self.post_attention_layernorm.weight, None,
                                               self.pre_feedforward_layernorm.weight, eps)
        if one and not cfg.enable_moe_block:
            return self._dense_end(self.mlp(u, project=False), x, ple, next_norm)
        m = self.mlp(u)
        if cfg.enable_moe_block:
            if not fused:
                z = ops.rms_norm(x, self._router_norm_weight(), eps)
                v = ops.rms_norm(x, self.pre_feedforward_layernorm_2.weight, eps)
            weights, ids = ops.moe_route(self.router.proj(z), cfg.top_k_experts, self._expert_scale())
            e = self.tp.all_reduce(ops.moe_experts(v, self.experts.gate_up_proj, self.experts.down_proj, weights, ids))
            if fused and ple is None and next_norm is not None:
                # norm(m) + norm(e), the post-FFN norm, residual add, layer scalar and the next norm: one launch
                return ops.moe_block_end(m, e, x, self.post_feedforward_layernorm_1.weight,
                                         self.post_feedforward_layernorm_2.weight,
                                         self.post_feedforward_layernorm.weight, self._scalar(), next_norm, eps)
            m1 = ops.rms_norm(m, self.post_feedforward_layernorm_1.weight, eps)
            m = ops.norm_add_scale(e, m1, self.post_feedforward_layernorm_2.weight, None, eps)   # m1 + norm(e)
        if ple is None:
            return self._end(m, x, self.post_feedforward_layernorm.weight, next_norm)
        return self._ple_end(ops.norm_add_scale(m, x, self.post_feedforward_layernorm.weight, None, eps), ple,
                             next_norm)

    def _dense_end(self, act, x, ple, next_norm) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A dense layer's end on one rank from the MLP's activations: down_proj with the post-FFN norm after it
        through ops.linear_norm_add_scale (then the per-layer-input block)."""
        eps = self.cfg.rms_norm_eps
        if ple is None:
            return ops.linear_norm_add_scale(act, self.mlp.down_proj.weight, x, self.post_feedforward_layernorm.weight,
                                             self._scalar(), next_norm, eps)
        x, _ = ops.linear_norm_add_scale(act, self.mlp.down_proj.weight, x, self.post_feedforward_layernorm.weight,
                                         None, None, eps)
        return self._ple_end(x, ple, next_norm)

    def _ple_end(self, x, ple, next_norm) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """E2B/E4B's per-layer-input block (replicated weights under --tp: no all-reduce): g = gelu(x·Wgᵀ)·ple, then
        (x + norm(g·Wpᵀ)) · layer_scalar and the next norm."""
        g = ops.linear_gelu_aux(x, self.per_layer_input_gate.weight, ple.to(x.dtype))
        return ops.linear_norm_add_scale(g, self.per_layer_projection.weight, x, self.post_per_layer_input_norm.weight,
                                         self._scalar(), next_norm, self.cfg.rms_norm_eps)

    def _end(self, y, x, weight, next_norm) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(x + norm(y)·weight) · layer_scalar, and its next norm when asked for."""
        eps = self.cfg.rms_norm_eps
        if next_norm is None:
            return ops.norm_add_scale(y, x, weight, self._scalar(), eps), None
        return ops.norm_add_scale_norm(y, x, weight, self._scalar(), next_norm, eps)

    def _derived(self, key: str, src: torch.Tensor, make) -> torch.Tensor:
        """make(src), made once and kept (again when src moves to another device): an operand the kernels want
        in another form than the checkpoint's. Made on each call it would be a torch kernel in every layer of a
        step (the per-expert scale's conversion: 30 copies a 26B-A4B decode step, between PDL launches)."""
        t = self.__dict__.get(key)
        if t is None or t.device != src.device:
            t = make(src.detach())
            self.__dict__[key] = t
        return t

    def _scalar(self) -> torch.Tensor:
        """The layer scalar as a [1] fp32 tensor."""
        return self._derived("_scalar_f32", self.layer_scalar, lambda t: t.reshape(1).float().contiguous())

    def _expert_scale(self) -> torch.Tensor:
        """The router's per-expert scale in fp32 (moe_route's operand)."""
        return self._derived("_expert_scale_f32", self.router.per_expert_scale, lambda t: t.float().contiguous())

    def _router_norm_weight(self) -> torch.Tensor:
        """The router's norm weight times d^-½, in the weight's dtype (one weighted norm)."""
        d = self.cfg.hidden_size
        return self._derived("_router_w", self.router.scale, lambda t: (t.float() * d ** -0.5).to(t.dtype))

class Gemma4TextModel(nn.Module):
    """Embeddings → decoder layers → final norm. `logits()` applies the tied LM head + soft-cap."""

    def __init__(self, cfg: TextConfig, tp: TP = NO_TP):
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        d = cfg.hidden_size
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = _param(cfg.vocab_size, d)
        self.layers = nn.ModuleList([DecoderLayer(cfg, s, tp) for s in cfg.layers])
        self.norm = Norm(d)
        if cfg.has_ple:
            L, P = cfg.num_layers, cfg.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Module()
            self.embed_tokens_per_layer.weight = _param(cfg.vocab_size_per_layer_input, L * P)
            self.per_layer_model_projection = Linear(d, L * P)
            self.per_layer_projection_norm = Norm(P)
        self._inv_freq: dict = {}        # (device) -> {layer type: [D/2]}, built on first use
        self.mm_token_ids: tuple[int, ...] = ()     # placeholders replaced by soft tokens

    def inv_freq(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._inv_freq:
            with torch.device("cpu"):
                self._inv_freq[key] = {
                    lt: ops.rope_inv_freq(self._head_dim(lt), r.theta, r.partial_rotary_factor,
                                          r.rope_type, r.factor).to(device)
                    for lt, r in self.cfg.rope.items() if self._has_type(lt)}
        return self._inv_freq[key]

    def _has_type(self, lt: str) -> bool:
        return any(l.layer_type == lt for l in self.cfg.layers)

    def _head_dim(self, lt: str) -> int:
        for l in self.cfg.layers:
            if l.layer_type == lt:
                return l.head_dim
        return 256

    def embed_scale(self) -> float:
        return float(torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=self.embed_tokens.weight.dtype))

    def embed(self, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings (soft tokens merged in) and the ids used for table lookups."""
        ids = ctx.input_ids
        lookup_ids = ids
        if ctx.soft_rows is not None and ctx.soft_rows.numel():
            lookup_ids = ids.clone()
            lookup_ids[ctx.soft_rows] = self.cfg.pad_token_id
        w = self.embed_tokens.weight
        x = (F.embedding(lookup_ids, w) * torch.tensor(self.embed_scale(), dtype=w.dtype)).to(w.dtype)
        if ctx.soft_rows is not None and ctx.soft_rows.numel():
            x[ctx.soft_rows] = ctx.soft_embeds.to(x.dtype)
        return x, lookup_ids

    def ple_token_rows(self, lookup_ids: torch.Tensor) -> torch.Tensor:
        """Token part of PLE before scaling: E_ple[ids] → [T, L·P]. When the table lives in (pinned)
        host memory the ids are gathered there and only the rows travel to the GPU."""
        w = self.embed_tokens_per_layer.weight
        if w.device != lookup_ids.device:
            return F.embedding(lookup_ids.to(w.device), w).to(lookup_ids.device, non_blocking=True)
        return F.embedding(lookup_ids, w)

    def per_layer_inputs(self, x0: torch.Tensor, lookup_ids: torch.Tensor,
                         token_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """PLE (§3.3): ((RMSNorm(W_pmp·x0·d^-½) + E_ple[ids]·√P) · 2^-½) → [T, L, P].
        token_rows: E_ple[ids] gathered by the caller (PLE table kept in host memory)."""
        cfg = self.cfg
        T, L, P = x0.shape[0], cfg.num_layers, cfg.hidden_size_per_layer_input
        rows = token_rows if token_rows is not None else self.ple_token_rows(lookup_ids)
        tok = rows.to(x0.dtype) * torch.tensor(math.sqrt(P), dtype=x0.dtype)
        proj = self.per_layer_model_projection(x0) * (cfg.hidden_size ** -0.5)
        proj = ops.rms_norm(proj.view(T, L, P), self.per_layer_projection_norm.weight, cfg.rms_norm_eps)
        return ((proj + tok.view(T, L, P)) * (2.0 ** -0.5)).to(x0.dtype)

    def forward(self, ctx: ForwardContext) -> torch.Tensor:
        """Returns the final-normed hidden states of the rows in ctx.logits_indices: [N, d]."""
        cfg = self.cfg
        x, lookup_ids = self.embed(ctx)
        ple = self.per_layer_inputs(x, lookup_ids, ctx.ple_token_rows) if cfg.has_ple else None
        cs = {lt: ops.rope_cos_sin(ctx.positions, f) for lt, f in self.inv_freq(x.device).items()}
        block_ids = ctx.block_ids if cfg.use_bidirectional_attention == "vision" else None
        first_shared = cfg.first_kv_shared_layer
        rows_sliced = False
        a = None                     # the next layer's input norm, made by the previous layer's last kernel
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            if (i == first_shared and cfg.num_kv_shared_layers and ctx.allow_shared_layer_skip
                    and block_ids is None and ctx.logits_indices.numel() < ctx.num_tokens):
                # YOCO-style: KV-shared layers only produce hidden states; run them only for the
                # rows whose logits are needed (a suffix of each request's rows).
                keep = ctx.logits_indices
                ctx, x, ple, cs = self._slice_rows(ctx, x, ple, cs)
                a = a[keep] if a is not None else None
                rows_sliced = True
                if x.shape[0] == 0:          # no logits wanted (a non-final prefill chunk)
                    a = None
                    break
            lt = layer.spec.layer_type
            cos, sin = cs[lt]
            nxt = self.layers[i + 1].input_layernorm.weight if i + 1 < n else self.norm.weight
            x, a = layer(x, ctx, cos, sin, ple[:, i] if ple is not None else None, block_ids, a, nxt)
        x = a if a is not None else ops.rms_norm(x, self.norm.weight, cfg.rms_norm_eps)
        return x if rows_sliced else x[ctx.logits_indices]

    def _slice_rows(self, ctx: ForwardContext, x, ple, cs):
        keep = ctx.logits_indices
        cu = ctx.cu_seqlens_q
        counts = torch.bucketize(keep, cu[1:], right=True)          # request of each kept row
        n_keep = torch.bincount(counts, minlength=cu.numel() - 1)
        new_cu = torch.zeros_like(cu)
        new_cu[1:] = torch.cumsum(n_keep, 0).to(cu.dtype)
        sub = ForwardContext(
            input_ids=ctx.input_ids[keep], positions=ctx.positions[keep], cu_seqlens_q=new_cu,
            seq_lens=ctx.seq_lens, page_tables=ctx.page_tables,
            slot_mappings={k: v[keep] for k, v in ctx.slot_mappings.items()}, kv=ctx.kv,
            logits_indices=torch.arange(keep.numel(), device=keep.device), block_ids=None,
            allow_shared_layer_skip=False, extras=ctx.extras)
        cs = {lt: (c[keep], s[keep]) for lt, (c, s) in cs.items()}
        return sub, x[keep], (ple[keep] if ple is not None else None), cs

    def fuse_projections(self) -> None:
        """After loading: fused q/k/v and gate/up matrices (fewer, larger GEMMs)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head + final soft-cap, fp32: [N, V]."""
        logits = ops.linear(hidden, self.embed_tokens.weight)
        return ops.softcap(logits, self.cfg.final_logit_softcapping)


__all__ = ["Gemma4TextModel", "DecoderLayer", "Attention", "MLP", "FULL", "SLIDING"]
