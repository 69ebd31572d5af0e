"""Pure-PyTorch references for every op the native kernels implement.

These are the specifications: each csrc kernel is tested against the function of the same name here
(tests/gpu), and on a machine without the extension the model runs these directly. They favour
clarity over speed, but are vectorised enough for the CPU path to serve tiny models.

Conventions: T = tokens in the step (all requests flattened), H = query heads, KVH = KV heads,
D = head dim, d = hidden size, V = vocabulary, P = pages in a pool, S = page size (token slots per
page), B = requests in the step. Norms compute in fp32 and cast back to the input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Norms and activations
# ----------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x², -1) + eps) · w  (no 1+w offset; w omitted = weightless norm).

    x: [..., n] any float dtype; weight: [n] or None. Computed in fp32, returned in x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + norm: r' = residual + x;  y = rms_norm(r', w).  Returns (y, r').

    x, residual: [T, n]; weight: [n]."""
    r = (residual.float() + x.float()).to(residual.dtype)
    return rms_norm(r, weight, eps), r


def norm_add_scale(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                   scale: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Gemma 4 post-FFN step: out = (residual + rms_norm(x, w)) · scale.

    x, residual: [T, d]; weight: [d]; scale: [1] (the layer scalar) or None (= 1). The sum is
    rounded to the working dtype before the scalar multiply, as the unfused model does."""
    r = (residual.float() + rms_norm(x, weight, eps).float()).to(x.dtype)
    if scale is not None:
        r = (r.float() * scale.float()).to(x.dtype)
    return r


def moe_block_end(m: torch.Tensor, e: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  w3: torch.Tensor, scale: Optional[torch.Tensor], w4: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The end of a MoE block (26B-A4B, §3.4): the shared MLP's output m and the experts' e are each
    normed and summed, f = rms_norm(m, w1) + rms_norm(e, w2) (rounded as norm_add_scale rounds), then
    h = norm_add_scale(f, x, w3, scale) is the new residual stream and y = rms_norm(h, w4) the next
    block's opening norm. Returns (h, y)."""
    f = norm_add_scale(e, rms_norm(m, w1, eps), w2, None, eps)
    h = norm_add_scale(f, x, w3, scale, eps)
    return h, rms_norm(h, w4, eps)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) · up in fp32, in gate's dtype (the per-layer-input gate, §3.3)."""
    return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = [gate | up]  →  gelu_tanh(gate) · up: [T, I]."""
    i = x.shape[-1] // 2
    return (F.gelu(x[..., :i].float(), approximate="tanh") * x[..., i:].float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, partial_rotary_factor: float = 1.0,
                  rope_type: str = "default", factor: float = 1.0) -> torch.Tensor:
    """Inverse frequencies, length head_dim/2, for rotate-half (NeoX) pairing i ↔ i + D/2.

    default:      f_i = θ^(−2i/D), i < D/2.
    proportional: the first n = int(p·D/2) pairs get f_i = θ^(−2i/D) (denominator = the FULL head dim),
                  the rest 0 (identity rotation). `factor` divides every frequency."""
    half = head_dim // 2
    idx = torch.arange(half, dtype=torch.float64)
    inv = theta ** (-2.0 * idx / head_dim)
    if rope_type == "proportional":
        n = int(partial_rotary_factor * head_dim / 2)
        inv[n:] = 0.0
    elif partial_rotary_factor != 1.0:
        n = int(partial_rotary_factor * head_dim / 2)
        inv[n:] = 0.0
    return (inv / factor).float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] int; inv_freq: [D/2] → cos, sin: [T, D/2] fp32."""
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the whole head: out = x·cos + rot(x)·sin, rot([a, b]) = [−b, a].

    x: [T, heads, D]; cos, sin: [T, D/2] (fp32). Returned in x.dtype."""
    xf = x.float()
    half = x.shape[-1] // 2
    a, b = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1).to(x.dtype)


def head_norm_rope(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                   cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-head RMSNorm (q_norm / k_norm, or the weightless v-norm when weight is None) followed by
    RoPE when cos/sin are given.  x: [T, heads, D]; weight: [D] or None; cos/sin: [T, D/2]."""
    y = rms_norm(x, weight, eps)
    if cos is not None:
        y = apply_rope(y, cos, sin)
    return y


# ----------------------------------------------------------------------------------------------
# Paged KV cache
# ----------------------------------------------------------------------------------------------


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new keys/values into their page slots (in place).

    k, v: [T, KVH, D]; k_cache, v_cache: [P, S, KVH, D]; slot_mapping: [T] int (page·S + offset;
    negative = do not store)."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    kc.index_copy_(0, slot_mapping.long(), k.to(kc.dtype))
    vc.index_copy_(0, slot_mapping.long(), v.to(vc.dtype))


def gather_kv(cache: torch.Tensor, page_table_row: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Keys (or values) of positions [start, end) of one request: [end−start, KVH, D].

    cache: [P, S, KVH, D]; page_table_row: [max_pages] int (logical page → physical page)."""
    S = cache.shape[1]
    pos = torch.arange(start, end, device=cache.device)
    pages = page_table_row.to(cache.device)[pos // S].long()
    return cache[pages, pos % S]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    page_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    sliding_window: Optional[int] = None, block_ids: Optional[torch.Tensor] = None,
                    scale: float = 1.0) -> torch.Tensor:
    """Paged attention for prefill chunks and decode alike (scale 1.0 for Gemma 4, no soft-cap).

    q: [T, H, D], request b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (q_len_b rows) whose
    positions are seq_lens[b] − q_len_b … seq_lens[b] − 1; its keys/values (positions
    0 … seq_lens[b] − 1, the new ones already stored) are read through page_table[b].
    GQA: query head h reads KV head h // (H / KVH).
    Mask: key j visible to query i iff j ≤ i and (no window or i − W < j), OR — bidirectional image
    blocks, sliding layers only — block_ids[query] == block_ids[key] ≥ 0 for a key inside the same
    step's chunk (then future keys of the block are visible too; the window still bounds the past).
    block_ids: [T] int or None (−1 = not in a block).
    Softmax in fp32.  Returns [T, H, D] in q.dtype."""
    T, H, D = q.shape
    KVH = k_cache.shape[2]
    group = H // KVH
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        q0, q1 = cu[b], cu[b + 1]
        n_q = q1 - q0
        if n_q == 0:
            continue
        L = lens[b]
        first_q = L - n_q
        k_start = 0
        if sliding_window is not None:
            k_start = max(0, first_q - sliding_window + 1)
        k = gather_kv(k_cache, page_table[b], k_start, L).float()       # [n_k, KVH, D]
        v = gather_kv(v_cache, page_table[b], k_start, L).float()
        qi = torch.arange(first_q, L, device=q.device)[:, None]
        kj = torch.arange(k_start, L, device=q.device)[None, :]
        allowed = kj <= qi
        if sliding_window is not None:
            allowed = allowed & (kj > qi - sliding_window)
        if block_ids is not None:
            qb = block_ids[q0:q1].to(q.device)
            kb = torch.full((L - k_start,), -1, dtype=qb.dtype, device=q.device)
            kb[first_q - k_start:] = qb                       # keys of this chunk carry its block ids
            same = (qb[:, None] == kb[None, :]) & (qb[:, None] >= 0)
            if sliding_window is not None:
                same = same & (kj > qi - sliding_window)
            allowed = allowed | same
        qq = q[q0:q1].float()                                   # [n_q, H, D]
        kk = k.repeat_interleave(group, dim=1)                   # [n_k, H, D]
        vv = v.repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        s = s.masked_fill(~allowed[None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, vv).to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------


def moe_route(router_logits: torch.Tensor, top_k: int,
              per_expert_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """p = softmax_fp32(logits) over all E experts; (w, ids) = top_k(p); w /= Σw; w *= scale[ids].

    router_logits: [T, E] → weights [T, k] fp32, ids [T, k] int32."""
    p = torch.softmax(router_logits.float(), dim=-1)
    w, ids = torch.topk(p, top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    if per_expert_scale is not None:
        w = w * per_expert_scale.float()[ids]
    return w, ids.to(torch.int32)


def moe_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k · Down_{id_k}( gelu_tanh(Gate_{id_k} x) ⊙ Up_{id_k} x ).

    x: [T, d]; gate_up: [E, 2I, d] (rows 0..I−1 gate, I..2I−1 up); down: [E, d, I];
    weights: [T, k] fp32; ids: [T, k] int. Returns [T, d] in x.dtype (accumulated in fp32)."""
    T, d = x.shape
    out = torch.zeros(T, d, dtype=torch.float32, device=x.device)
    flat_ids = ids.reshape(-1).long()
    flat_tok = torch.arange(T, device=x.device).repeat_interleave(ids.shape[1])
    flat_w = weights.reshape(-1)
    for e in torch.unique(flat_ids).tolist():
        sel = flat_ids == e
        toks = flat_tok[sel]
        h = x[toks] @ gate_up[e].t()                     # [n, 2I]
        h = gelu_tanh_and_mul(h)
        y = (h @ down[e].t()).float()                    # [n, d]
        out.index_add_(0, toks, y * flat_w[sel][:, None])
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Logits and sampling
# ----------------------------------------------------------------------------------------------


def softcap(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """logits ← cap · tanh(logits / cap) in fp32 (cap None or 0: unchanged, just fp32)."""
    x = logits.float()
    if cap:
        x = torch.tanh(x / cap) * cap
    return x


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, prompt_mask: torch.Tensor,
                    repetition: torch.Tensor, frequency: torch.Tensor,
                    presence: torch.Tensor) -> torch.Tensor:
    """In place on fp32 logits [N, V]:
    repetition (rep ≠ 1, tokens seen in prompt or output): l > 0 → l / rep, else l · rep;
    frequency/presence (output tokens): l −= freq · count + pres · [count > 0].
    output_counts: [N, V] int; prompt_mask: [N, V] bool; repetition/frequency/presence: [N]."""
    seen = prompt_mask | (output_counts > 0)
    rep = repetition[:, None].expand_as(logits)
    pen = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, pen, logits))
    logits -= frequency[:, None] * output_counts.float() + presence[:, None] * (output_counts > 0).float()
    return logits


def top_k_top_p_min_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                             min_p: torch.Tensor) -> torch.Tensor:
    """Mask (−inf) tokens outside: the top_k largest (k ≤ 0: all), the smallest prefix of the
    descending distribution whose mass reaches top_p (always ≥ 1 token), and tokens whose
    probability is below min_p · p_max. logits: [N, V] fp32 (already temperature-scaled);
    top_k [N] int, top_p [N] float, min_p [N] float. Returns a new tensor."""
    N, V = logits.shape
    sorted_l, order = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k <= 0, torch.full_like(top_k, V), top_k.clamp(max=V))
    keep = ranks < k[:, None]
    probs = torch.softmax(sorted_l.masked_fill(~keep, float("-inf")), dim=-1)
    cum = probs.cumsum(-1)
    keep = keep & ((cum - probs) < top_p[:, None])
    keep = keep & (probs >= min_p[:, None] * probs[:, :1])
    keep[:, 0] = True
    masked = sorted_l.masked_fill(~keep, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, masked)


def sample_from_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor, min_p: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """Sample one token per row. Greedy rows (temperature ≤ 0) take argmax. Others: scale by
    1/temperature, filter with top-k/top-p/min-p, and pick argmax(p / E) with E ~ Exp(1) given per
    row by `noise` [N, V] (the exponential-race form of categorical sampling, so a seeded noise
    stream makes the choice reproducible). logits: [N, V] fp32 → ids [N] int64."""
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits / t[:, None]
    filt = top_k_top_p_min_p_filter(scaled, top_k, top_p, min_p)
    probs = torch.softmax(filt, dim=-1)
    sampled = torch.argmax(probs / noise.clamp_min(1e-20), dim=-1)
    return torch.where(greedy, torch.argmax(logits, dim=-1), sampled)


def logprobs_topk(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of (soft-capped) logits [N, V]: the chosen tokens' logprobs [N], and the top-k
    (values [N, k], ids [N, k])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = lp.gather(1, chosen.long()[:, None])[:, 0]
    if k > 0:
        vals, ids = torch.topk(lp, k, dim=-1)
    else:
        vals = lp.new_zeros(lp.shape[0], 0)
        ids = torch.zeros(lp.shape[0], 0, dtype=torch.long, device=lp.device)
    return chosen_lp, vals, ids


def exponential_noise(seed: int, step: int, vocab: int, device="cpu") -> torch.Tensor:
    """Reproducible Exp(1) noise for one row: a generator seeded by (seed, step)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step * 7919 + 12345) % (2 ** 63 - 1))
    u = torch.rand(vocab, generator=g, dtype=torch.float32)
    return (-torch.log1p(-u.clamp(max=1 - 1e-7))).to(device)

