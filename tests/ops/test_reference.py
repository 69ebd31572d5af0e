"""Each reference op against a plain dense formula written independently here."""
import math

import pytest
import torch
import torch.nn.functional as F

from gemma4rt.ops import reference as ref

torch.manual_seed(0)


def test_rms_norm_with_and_without_weight():
    x = torch.randn(5, 7, 33)
    w = torch.rand(33) + 0.5
    dense = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(ref.rms_norm(x, w, 1e-6), dense * w, atol=1e-6)
    assert torch.allclose(ref.rms_norm(x, None, 1e-6), dense, atol=1e-6)
    # bf16 input: computed in fp32, returned in bf16
    xb = x.bfloat16()
    out = ref.rms_norm(xb, w.bfloat16(), 1e-6)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), dense * w, atol=3e-2, rtol=2e-2)


def test_add_rms_norm_and_norm_add_scale():
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    w, s = torch.rand(16) + 0.5, torch.tensor([0.7])
    y, r2 = ref.add_rms_norm(x, r, w, 1e-6)
    assert torch.allclose(r2, x + r)
    assert torch.allclose(y, ref.rms_norm(x + r, w, 1e-6))
    out = ref.norm_add_scale(x, r, w, s, 1e-6)
    assert torch.allclose(out, (r + ref.rms_norm(x, w, 1e-6)) * 0.7, atol=1e-6)
    assert torch.allclose(ref.norm_add_scale(x, r, w, None, 1e-6), r + ref.rms_norm(x, w, 1e-6), atol=1e-6)


def test_gelu_tanh_and_mul():
    x = torch.randn(3, 10)
    g, u = x[:, :5], x[:, 5:]
    dense = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * u
    assert torch.allclose(ref.gelu_tanh_and_mul(x), dense, atol=1e-6)


def _rope_dense(x, pos, inv):
    # pairs (i, i + D/2) rotated by angle pos·inv[i]
    D = x.shape[-1]
    out = x.clone()
    for t in range(x.shape[0]):
        for i in range(D // 2):
            a = pos[t] * inv[i]
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[t, :, i], x[t, :, i + D // 2]
            out[t, :, i] = x1 * c - x2 * s
            out[t, :, i + D // 2] = x2 * c + x1 * s
    return out


def test_rope_default_and_proportional():
    pos = torch.tensor([0, 3, 17, 250])
    x = torch.randn(4, 2, 32)
    inv = ref.rope_inv_freq(32, 1e4)
    assert torch.allclose(inv, torch.tensor([1e4 ** (-2 * i / 32) for i in range(16)]), rtol=1e-6)
    cos, sin = ref.rope_cos_sin(pos, inv)
    assert torch.allclose(ref.apply_rope(x, cos, sin), _rope_dense(x, pos.tolist(), inv.tolist()), atol=1e-5)
    # proportional: first int(0.25·D/2) pairs rotate with the FULL head dim as denominator, rest identity
    invp = ref.rope_inv_freq(32, 1e6, 0.25, "proportional")
    n = int(0.25 * 32 / 2)
    assert torch.allclose(invp[:n], torch.tensor([1e6 ** (-2 * i / 32) for i in range(n)]), rtol=1e-6)
    assert (invp[n:] == 0).all()
    cos, sin = ref.rope_cos_sin(pos, invp)
    y = ref.apply_rope(x, cos, sin)
    assert torch.allclose(y, _rope_dense(x, pos.tolist(), invp.tolist()), atol=1e-5)
    untouched = [d for d in range(32) if not (d < n or 16 <= d < 16 + n)]
    assert torch.equal(y[..., untouched], x[..., untouched])


def test_head_norm_rope_is_norm_then_rope():
    x, w = torch.randn(3, 4, 16), torch.rand(16) + 0.5
    cos, sin = ref.rope_cos_sin(torch.tensor([1, 2, 3]), ref.rope_inv_freq(16, 1e4))
    assert torch.allclose(ref.head_norm_rope(x, w, 1e-6, cos, sin),
                          ref.apply_rope(ref.rms_norm(x, w, 1e-6), cos, sin))
    assert torch.allclose(ref.head_norm_rope(x, None, 1e-6, None, None), ref.rms_norm(x, None, 1e-6))


def _paged(kv_dense_list, S, P, shuffle=True):
    """Scatter per-request dense [L, KVH, D] K/V into a page pool; return cache, page table."""
    KVH, D = kv_dense_list[0].shape[1:]
    cache = torch.full((P, S, KVH, D), float("nan"))
    perm = torch.randperm(P).tolist() if shuffle else list(range(P))
    tables, nxt = [], 0
    for kv in kv_dense_list:
        n_pages = (kv.shape[0] + S - 1) // S
        pages = perm[nxt:nxt + n_pages]
        nxt += n_pages
        for p in range(kv.shape[0]):
            cache[pages[p // S], p % S] = kv[p]
        tables.append(pages)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    return cache, table


@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_matches_dense(window):
    H, KVH, D, S = 4, 2, 8, 4
    lens, qlens = [9, 5, 13], [3, 5, 1]       # chunk, whole prompt, decode
    ks = [torch.randn(L, KVH, D) for L in lens]
    vs = [torch.randn(L, KVH, D) for L in lens]
    kc, table = _paged(ks, S, 16)
    vc, _ = _paged(vs, S, 16, shuffle=False)
    # the same page table must address V: rebuild V with K's table
    vc = torch.full_like(kc, float("nan"))
    for b, L in enumerate(lens):
        for p in range(L):
            vc[table[b, p // S], p % S] = vs[b][p]
    q = torch.randn(sum(qlens), H, D)
    cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    out = ref.paged_attention(q, kc, vc, table, cu, torch.tensor(lens), window)
    for b, (L, n) in enumerate(zip(lens, qlens)):
        for r in range(n):
            i = L - n + r
            qi = q[cu[b] + r]
            for h in range(H):
                kh = h // (H // KVH)
                js = [j for j in range(L) if j <= i and (window is None or i - j < window)]
                s = torch.stack([qi[h] @ ks[b][j, kh] for j in js])
                p = torch.softmax(s, 0)
                o = sum(p[t] * vs[b][j, kh] for t, j in enumerate(js))
                assert torch.allclose(out[cu[b] + r, h], o, atol=1e-5)


def test_paged_attention_bidirectional_block():
    H, KVH, D, S, W = 2, 1, 8, 4, 3
    L = 8
    k, v = torch.randn(L, KVH, D), torch.randn(L, KVH, D)
    kc, table = _paged([k], S, 4, shuffle=False)
    vc, _ = _paged([v], S, 4, shuffle=False)
    q = torch.randn(L, H, D)
    blocks = torch.tensor([-1, -1, 0, 0, 0, 0, -1, -1])     # positions 2..5 form one image
    cu = torch.tensor([0, L], dtype=torch.int32)
    out = ref.paged_attention(q, kc, vc, table, cu, torch.tensor([L]), W, blocks)
    for i in range(L):
        js = [j for j in range(L) if i - W < j and (j <= i or (blocks[i] >= 0 and blocks[i] == blocks[j]))]
        for h in range(H):
            s = torch.stack([q[i, h] @ k[j, 0] for j in js])
            o = sum(p * v[j, 0] for p, j in zip(torch.softmax(s, 0), js))
            assert torch.allclose(out[i, h], o, atol=1e-5), (i, js)


def test_store_kv_writes_slots_and_skips_negative():
    kc = torch.zeros(3, 4, 1, 2)
    vc = torch.zeros(3, 4, 1, 2)
    k = torch.randn(3, 1, 2)
    v = torch.randn(3, 1, 2)
    ref.store_kv(k, v, kc, vc, torch.tensor([5, -1, 11]))
    assert torch.equal(kc[1, 1], k[0]) and torch.equal(vc[2, 3], v[2])
    assert int((kc != 0).any(-1).sum()) == 2


def test_moe_route_and_experts_dense():
    T, E, d, I, k = 5, 6, 8, 3, 2
    logits = torch.randn(T, E)
    scale = torch.rand(E) + 0.5
    w, ids = ref.moe_route(logits, k, scale)
    p = torch.softmax(logits, -1)
    for t in range(T):
        top = torch.argsort(p[t], descending=True)[:k]
        assert set(ids[t].tolist()) == set(top.tolist())
        for j in range(k):
            e = int(ids[t, j])
            assert torch.allclose(w[t, j], p[t, e] / p[t, top].sum() * scale[e], atol=1e-6)
    x = torch.randn(T, d)
    gu, dn = torch.randn(E, 2 * I, d), torch.randn(E, d, I)
    out = ref.moe_experts(x, gu, dn, w, ids)
    for t in range(T):
        acc = torch.zeros(d)
        for j in range(k):
            e = int(ids[t, j])
            h = gu[e] @ x[t]
            acc += w[t, j] * (dn[e] @ (F.gelu(h[:I], approximate="tanh") * h[I:]))
        assert torch.allclose(out[t], acc, atol=1e-4)


def test_softcap_penalties_and_filters():
    x = torch.randn(2, 10) * 50
    assert torch.allclose(ref.softcap(x, 30.0), 30 * torch.tanh(x / 30))
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[0, 2, 0, 1]])
    pmask = torch.tensor([[True, False, False, False]])
    out = ref.apply_penalties(logits.clone(), counts, pmask, torch.tensor([2.0]), torch.tensor([0.5]),
                              torch.tensor([0.25]))
    expect = torch.tensor([[2.0 / 2, -1.0 * 2 - 0.5 * 2 - 0.25, 0.5, 3.0 / 2 - 0.5 - 0.25]])
    assert torch.allclose(out, expect)
    l = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    f = ref.top_k_top_p_min_p_filter(l, torch.tensor([0]), torch.tensor([0.7]), torch.tensor([0.0]))
    assert torch.isfinite(f).tolist() == [[True, True, False, False]]
    f = ref.top_k_top_p_min_p_filter(l, torch.tensor([1]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.isfinite(f).tolist() == [[True, False, False, False]]
    f = ref.top_k_top_p_min_p_filter(l, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.25]))
    assert torch.isfinite(f).tolist() == [[True, True, True, False]]


def test_sampling_is_seeded_and_follows_the_distribution():
    V = 5
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    logits = torch.log(probs.clamp_min(1e-30))[None]
    one = torch.ones(1)
    counts = torch.zeros(V)
    n = 4000
    for step in range(n):
        noise = ref.exponential_noise(7, step, V)[None]
        t = ref.sample_from_logits(logits, one, torch.tensor([0]), one, torch.zeros(1), noise)
        counts[t] += 1
    freq = counts / n
    assert torch.allclose(freq, probs, atol=0.03), freq
    a = ref.sample_from_logits(logits, one, torch.tensor([0]), one, torch.zeros(1), ref.exponential_noise(3, 9, V)[None])
    b = ref.sample_from_logits(logits, one, torch.tensor([0]), one, torch.zeros(1), ref.exponential_noise(3, 9, V)[None])
    assert a.item() == b.item()
    greedy = ref.sample_from_logits(logits, torch.zeros(1), torch.tensor([0]), one, torch.zeros(1), torch.ones(1, V))
    assert greedy.item() == 0


def test_gelu_tanh_mul_equals_the_concatenated_form():
    g, u = torch.randn(5, 24, dtype=torch.bfloat16), torch.randn(5, 24, dtype=torch.bfloat16)
    assert torch.equal(ref.gelu_tanh_mul(g, u), ref.gelu_tanh_and_mul(torch.cat([g, u], -1)))
