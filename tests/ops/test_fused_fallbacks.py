"""The fused Python ops (ops.linear_gelu_mul, ops.qkv_norm_rope_store) on the CPU: they must equal the
unfused sequence they replace, which is their specification (their native kernels are compared with the
same sequence in tests/gpu)."""
import torch

from gemma4rt import ops
from gemma4rt.ops import reference as ref


def test_linear_gelu_mul_is_gemm_then_gelu_and_mul():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    w = torch.randn(2 * 40, 64)
    want = ref.gelu_tanh_and_mul(x @ w.t())
    assert torch.allclose(ops.linear_gelu_mul(x, w), want, atol=1e-5)
    g, u = (x @ w.t()).split(40, dim=1)
    assert torch.allclose(want, torch.nn.functional.gelu(g, approximate="tanh") * u, atol=1e-5)


def test_qkv_norm_rope_store_is_norms_then_store():
    torch.manual_seed(0)
    T, H, KVH, D, P, S = 5, 4, 2, 16, 3, 4
    qkv = torch.randn(T, (H + 2 * KVH) * D)
    q = qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + KVH) * D].view(T, KVH, D)
    v = qkv[:, (H + KVH) * D:].view(T, KVH, D)
    qw, kw = torch.randn(D), torch.randn(D)
    cos, sin = ref.rope_cos_sin(torch.arange(T), ref.rope_inv_freq(D, 10000.0))
    slots = torch.tensor([0, 5, -1, 7, 11])
    kc, vc = torch.zeros(P, S, KVH, D), torch.zeros(P, S, KVH, D)
    out = ops.qkv_norm_rope_store(q, k, v, qw, kw, 1e-6, cos, sin, kc, vc, slots)
    assert torch.allclose(out, ref.head_norm_rope(q, qw, 1e-6, cos, sin))
    kn, vn = ref.head_norm_rope(k, kw, 1e-6, cos, sin), ref.rms_norm(v, None, 1e-6)
    flat_k, flat_v = kc.view(P * S, KVH, D), vc.view(P * S, KVH, D)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.allclose(flat_k[s], kn[t]) and torch.allclose(flat_v[s], vn[t])
    written = {s for s in slots.tolist() if s >= 0}
    for s in range(P * S):
        if s not in written:        # the negative slot wrote nothing anywhere
            assert not flat_k[s].any() and not flat_v[s].any()


def test_moe_norms_are_the_separate_norms():
    """ops.norm_add_scale_norm3 and ops.moe_block_end (the MoE block's fused norms) against the ops they
    replace in text.py's unfused path, in bf16 so that every rounding point counts."""
    torch.manual_seed(0)
    d, n = torch.bfloat16, 48
    a, x, m, e = (torch.randn(3, n, dtype=d) * 2 for _ in range(4))
    w1, w2, w3, w4 = (torch.randn(n, dtype=d) for _ in range(4))
    sc = torch.tensor([0.7])
    h, u, z, v = ops.norm_add_scale_norm3(a, x, w1, None, w2, w3, w4, 1e-6)
    h2, u2 = ops.norm_add_scale_norm(a, x, w1, None, w2, 1e-6)
    assert torch.equal(h, h2) and torch.equal(u, u2)
    assert torch.equal(z, ops.rms_norm(h2, w3, 1e-6)) and torch.equal(v, ops.rms_norm(h2, w4, 1e-6))
    hh, y = ops.moe_block_end(m, e, x, w1, w2, w3, sc, w4, 1e-6)
    f = ops.norm_add_scale(e, ops.rms_norm(m, w1, 1e-6), w2, None, 1e-6)
    assert not torch.equal(f, ops.norm_add_scale(m, ops.rms_norm(e, w1, 1e-6), w2, None, 1e-6))  # order matters
    hh2, y2 = ops.norm_add_scale_norm(f, x, w3, sc, w4, 1e-6)
    assert torch.equal(hh, hh2) and torch.equal(y, y2)


def test_linear_norm_add_scale_is_gemm_then_the_norms():
    torch.manual_seed(0)
    x, w, res = torch.randn(3, 64), torch.randn(48, 64), torch.randn(3, 48)
    w1, w2, sc = torch.randn(48), torch.randn(48), torch.tensor([0.5])
    y = x @ w.t()
    h, n = ops.linear_norm_add_scale(x, w, res, w1, sc, w2, 1e-6)
    want_h = ref.norm_add_scale(y, res, w1, sc, 1e-6)
    assert torch.allclose(h, want_h, atol=1e-5) and torch.allclose(n, ref.rms_norm(want_h, w2, 1e-6), atol=1e-5)
    h1, none = ops.linear_norm_add_scale(x, w, res, w1, None, None, 1e-6)
    assert none is None and torch.allclose(h1, ref.norm_add_scale(y, res, w1, None, 1e-6), atol=1e-5)


def test_linear_norm_add_scale_norm3_is_gemm_then_the_three_norms(monkeypatch):
    """ops.linear_norm_add_scale_norm3 (a MoE layer's o_proj and its block's three opening norms) on the CPU, with
    its switch on and off: the projection, then norm_add_scale_norm3."""
    import importlib
    lin = importlib.import_module("gemma4rt.ops.linear")        # (gemma4rt.ops.linear is also a function)
    torch.manual_seed(1)
    d = torch.bfloat16
    x, w, res = torch.randn(2, 64, dtype=d), torch.randn(48, 64, dtype=d), torch.randn(2, 48, dtype=d)
    w1, w2, w3, w4 = (torch.randn(48, dtype=d) for _ in range(4))
    want = ops.norm_add_scale_norm3(ops.linear(x, w), res, w1, None, w2, w3, w4, 1e-6)
    for on in (False, True):
        monkeypatch.setattr(lin, "FUSED_GEMV_NORM3", on)
        got = ops.linear_norm_add_scale_norm3(x, w, res, w1, None, w2, w3, w4, 1e-6)
        assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(want[1], want[2])          # three different norms came back


def test_linear_gelu_aux_is_gemm_then_gelu_mul():
    torch.manual_seed(0)
    x, w = torch.randn(3, 64), torch.randn(40, 64)
    aux = torch.randn(3, 2, 40)[:, 1]                       # a strided slice, as the per-layer inputs
    want = torch.nn.functional.gelu(x @ w.t(), approximate="tanh") * aux
    assert torch.allclose(ops.linear_gelu_aux(x, w, aux), want, atol=1e-5)


def test_the_gemv_norm_wrappers_pass_the_op_its_arguments_in_schema_order(monkeypatch):
    """ops.linear_norm_add_scale and ops.linear_norm_add_scale_norm3 as they call the native gemv_norm (one, none
    or three norms), on the CPU through a stand-in with the op's schema (csrc/torch_bindings.cpp: x, w, residual,
    w1, scale, w2, eps, y, h, normed, counter, kernel=0, w3=None, w4=None, normed3=None, normed4=None) that
    computes with the reference ops: the wrappers give what their unfused fallbacks give."""
    import importlib
    import types
    lin = importlib.import_module("gemma4rt.ops.linear")
    calls = []

    def gemv_norm(x, w, residual, w1, scale, w2, eps, y, h, normed, counter, kernel=0, w3=None, w4=None,
                  normed3=None, normed4=None):
        assert counter.dtype == torch.int32 and kernel == lin.W_STATIC
        assert (w3 is None) == (normed3 is None) and (w4 is None) == (normed4 is None)
        calls.append(sum(t is not None for t in (w2, w3, w4)))
        y.copy_(x @ w.t())
        h.copy_(ref.norm_add_scale(y, residual, w1, scale, eps))
        for wn, out in ((w2, normed), (w3, normed3), (w4, normed4)):
            if wn is not None:
                out.copy_(ref.rms_norm(h, wn, eps))

    monkeypatch.setattr(torch.ops, "gemma4rt", types.SimpleNamespace(gemv_norm=gemv_norm), raising=False)
    monkeypatch.setattr(lin._native, "has_op", lambda name: name == "gemv_norm")
    monkeypatch.setattr(lin, "gemv_ok", lambda x, w: True)
    monkeypatch.setattr(lin, "gemv_norm_counter", lambda device: torch.zeros(lin.GEMV_COUNTER_SLOTS, dtype=torch.int32))
    monkeypatch.setattr(lin, "FUSED_GEMV_NORM", True)
    monkeypatch.setattr(lin, "FUSED_GEMV_NORM3", True)
    torch.manual_seed(2)
    x, w, res = torch.randn(2, 64), torch.randn(48, 64), torch.randn(2, 48)
    w1, w2, w3, w4 = (torch.randn(48) for _ in range(4))
    sc = torch.tensor([0.5])
    y = x @ w.t()
    h, n = lin.linear_norm_add_scale(x, w, res, w1, sc, w2, 1e-6)
    want_h = ref.norm_add_scale(y, res, w1, sc, 1e-6)
    want_n = ref.rms_norm(want_h, w2, 1e-6)
    assert torch.equal(h, want_h) and torch.equal(n, want_n)
    h0, none = lin.linear_norm_add_scale(x, w, res, w1, None, None, 1e-6)
    assert none is None and torch.equal(h0, ref.norm_add_scale(y, res, w1, None, 1e-6))
    got = lin.linear_norm_add_scale_norm3(x, w, res, w1, None, w2, w3, w4, 1e-6)
    h3 = ref.norm_add_scale(y, res, w1, None, 1e-6)
    assert len(got) == 4 and torch.equal(got[0], h3)
    assert all(torch.equal(a, ref.rms_norm(h3, wn, 1e-6)) for a, wn in zip(got[1:], (w2, w3, w4)))
    assert calls == [1, 0, 3]                       # each went through the stand-in, with its norms
