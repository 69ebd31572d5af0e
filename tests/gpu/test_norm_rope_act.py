"""Native norms, head-norm+RoPE and gelu-and-mul vs the references (odd sizes, strided views,
bf16/fp16/fp32, poisoned outputs, opcheck, CUDA-graph replay)."""
import pytest
import torch

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_util import require_native  # noqa: E402

require_native()

from gpu_util import DEV, assert_close, graph_replay, poison  # noqa: E402
from gemma4rt.ops import activation, norm, rope  # noqa: E402
from gemma4rt.ops import reference as ref  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SIZES = [(1, 2816), (7, 5376), (33, 1000), (5, 130), (3, 77)]


def _x(rows, n, dtype, strided):
    if strided:  # a row-strided view: every other row of a wider buffer, offset columns
        big = torch.randn(rows * 2, n + 24, device=DEV, dtype=dtype) * 2
        return big[::2, 8:8 + n]
    return torch.randn(rows, n, device=DEV, dtype=dtype) * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm(dtype, rows, n, strided):
    x = _x(rows, n, dtype, strided)
    w = torch.randn(n, device=DEV, dtype=dtype)
    for weight in (w, None):
        out = poison(rows, n, dtype=dtype)
        torch.ops.gemma4rt.rms_norm(x, weight, 1e-6, out)
        assert_close(out, ref.rms_norm(x, weight, 1e-6), dtype, "rms_norm")
        assert_close(norm.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6), dtype, "rms_norm wrapper")


def test_norm_refuses_bad_arguments_with_an_error():
    """A weight of the wrong size and an unsupported dtype raise a RuntimeError naming the problem, and the
    process goes on (on the device's torch 2.11 a check message that streamed a number crashed it instead:
    tests/ops/test_csrc_messages.py)."""
    x = torch.randn(3, 256, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.gemma4rt.rms_norm(x, torch.ones(255, device=DEV, dtype=x.dtype), 1e-6, torch.empty_like(x))
    x64 = x.double()
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.gemma4rt.rms_norm(x64, None, 1e-6, torch.empty_like(x64))
    out = torch.empty_like(x)                       # and the op still works
    torch.ops.gemma4rt.rms_norm(x, None, 1e-6, out)
    assert_close(out, ref.rms_norm(x, None, 1e-6), x.dtype, "rms_norm after the errors")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
def test_add_rms_norm(dtype, rows, n):
    x, r = _x(rows, n, dtype, True), _x(rows, n, dtype, False)
    w = torch.randn(n, device=DEV, dtype=dtype)
    out, r_out = poison(rows, n, dtype=dtype), poison(rows, n, dtype=dtype)
    torch.ops.gemma4rt.add_rms_norm(x, r, w, 1e-6, out, r_out)
    ey, er = ref.add_rms_norm(x, r, w, 1e-6)
    assert_close(r_out, er, dtype, "residual")
    assert_close(out, ey, dtype, "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
def test_norm_add_scale(dtype, rows, n):
    x, r = _x(rows, n, dtype, True), _x(rows, n, dtype, False)
    w = torch.randn(n, device=DEV, dtype=dtype)
    for scale in (torch.tensor([0.37], device=DEV), None):
        out = poison(rows, n, dtype=dtype)
        torch.ops.gemma4rt.norm_add_scale(x, r, w, scale, 1e-6, out)
        assert_close(out, ref.norm_add_scale(x, r, w, scale, 1e-6), dtype, "norm_add_scale")
        assert_close(norm.norm_add_scale(x, r, w, scale, 1e-6), ref.norm_add_scale(x, r, w, scale, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
def test_norm_add_scale_norm(dtype, rows, n):
    x, r = _x(rows, n, dtype, True), _x(rows, n, dtype, False)
    w, w2 = torch.randn(n, device=DEV, dtype=dtype), torch.randn(n, device=DEV, dtype=dtype)
    for scale, weight2 in ((torch.tensor([0.37], device=DEV), w2), (None, w2), (None, None)):
        out, normed = poison(rows, n, dtype=dtype), poison(rows, n, dtype=dtype)
        torch.ops.gemma4rt.norm_add_scale_norm(x, r, w, scale, weight2, 1e-6, out, normed)
        eh = ref.norm_add_scale(x, r, w, scale, 1e-6)
        assert_close(out, eh, dtype, "norm_add_scale_norm residual")
        assert_close(normed, ref.rms_norm(eh, weight2, 1e-6), dtype, "norm_add_scale_norm normed")
        h, nn_ = norm.norm_add_scale_norm(x, r, w, scale, weight2, 1e-6)
        assert_close(h, eh, dtype)
        assert_close(nn_, ref.rms_norm(eh, weight2, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
def test_norm_add_scale_norm3(dtype, rows, n):
    """Three norms of the new residual stream with three weights: each equals rms_norm of the residual."""
    x, r = _x(rows, n, dtype, True), _x(rows, n, dtype, False)
    w, w2, w3, w4 = (torch.randn(n, device=DEV, dtype=dtype) for _ in range(4))
    for scale in (torch.tensor([0.37], device=DEV), None):
        out = poison(rows, n, dtype=dtype)
        normed = poison(3, rows, n + 8, dtype=dtype)[:, :, 4:4 + n]     # row stride n + 8
        torch.ops.gemma4rt.norm_add_scale_norm3(x, r, w, scale, w2, w3, w4, 1e-6, out, normed[0], normed[1], normed[2])
        eh = ref.norm_add_scale(x, r, w, scale, 1e-6)
        assert_close(out, eh, dtype, "norm_add_scale_norm3 residual")
        for i, wi in enumerate((w2, w3, w4)):
            assert_close(normed[i], ref.rms_norm(eh, wi, 1e-6), dtype, f"norm_add_scale_norm3 normed {i}")
        got = norm.norm_add_scale_norm3(x, r, w, scale, w2, w3, w4, 1e-6)
        want = (eh,) + tuple(ref.rms_norm(eh, wi, 1e-6) for wi in (w2, w3, w4))
        for g, e in zip(got, want):
            assert_close(g, e, dtype, "norm_add_scale_norm3 wrapper")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
def test_moe_block_end(dtype, rows, n):
    m, e, x = _x(rows, n, dtype, True), _x(rows, n, dtype, False), _x(rows, n, dtype, True)
    w1, w2, w3, w4 = (torch.randn(n, device=DEV, dtype=dtype) for _ in range(4))
    for scale in (torch.tensor([0.37], device=DEV), None):
        out, normed = poison(rows, n, dtype=dtype), poison(rows, n, dtype=dtype)
        torch.ops.gemma4rt.moe_block_end(m, e, x, w1, w2, w3, scale, w4, 1e-6, out, normed)
        eh, ey = ref.moe_block_end(m, e, x, w1, w2, w3, scale, w4, 1e-6)
        assert_close(out, eh, dtype, "moe_block_end residual")
        assert_close(normed, ey, dtype, "moe_block_end normed")
        h, y = norm.moe_block_end(m, e, x, w1, w2, w3, scale, w4, 1e-6)
        assert_close(h, eh, dtype, "moe_block_end wrapper")
        assert_close(y, ey, dtype, "moe_block_end wrapper normed")


def test_moe_block_end_equals_the_separate_ops_bit_for_bit():
    """The fused MoE-block end and opening norms give the separate native launches' bits (same rounding
    points, same reduction order), so GEMMA4RT_FUSED_MOE_NORMS=0 changes no result."""
    d, rows, n = torch.bfloat16, 5, 2816
    m, e, x, a = (torch.randn(rows, n, device=DEV, dtype=d) * 2 for _ in range(4))
    w1, w2, w3, w4 = (torch.randn(n, device=DEV, dtype=d) for _ in range(4))
    sc = torch.tensor([0.61], device=DEV)
    h, y = norm.moe_block_end(m, e, x, w1, w2, w3, sc, w4, 1e-6)
    f = norm.norm_add_scale(e, norm.rms_norm(m, w1, 1e-6), w2, None, 1e-6)
    h2, y2 = norm.norm_add_scale_norm(f, x, w3, sc, w4, 1e-6)
    assert torch.equal(h, h2) and torch.equal(y, y2)
    hx, u, z, v = norm.norm_add_scale_norm3(a, x, w1, None, w2, w3, w4, 1e-6)
    hx2, u2 = norm.norm_add_scale_norm(a, x, w1, None, w2, 1e-6)
    assert torch.equal(hx, hx2) and torch.equal(u, u2)
    assert torch.equal(z, norm.rms_norm(hx2, w3, 1e-6)) and torch.equal(v, norm.rms_norm(hx2, w4, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 256), (35, 256), (6, 100), (3, 37)])
def test_gelu_tanh_mul(dtype, T, I):
    big = torch.randn(T, 5, I, device=DEV, dtype=dtype) * 2
    gate, up = big[:, 1], big[:, 3]            # row-strided views (as the PLE slice of one layer)
    out = poison(T, I, dtype=dtype)
    torch.ops.gemma4rt.gelu_tanh_mul(gate, up, out)
    assert_close(out, ref.gelu_tanh_mul(gate, up), dtype, "gelu_tanh_mul")
    assert_close(activation.gelu_tanh_mul(gate, up), ref.gelu_tanh_mul(gate, up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,D", [(1, 8, 256), (13, 4, 512), (5, 3, 128), (9, 2, 72)])
@pytest.mark.parametrize("mode", ["rope", "norope", "vnorm"])
def test_head_norm_rope(dtype, T, H, D, mode):
    big = torch.randn(T, H + 3, D, device=DEV, dtype=dtype)
    x = big[:, 1:1 + H]  # strided over heads (as a slice of a fused qkv projection)
    w = None if mode == "vnorm" else torch.randn(D, device=DEV, dtype=dtype)
    cos = sin = None
    if mode == "rope":
        inv = ref.rope_inv_freq(D, 1e6, 0.25, "proportional")
        cos, sin = ref.rope_cos_sin(torch.randint(0, 9000, (T,), device=DEV), inv.to(DEV))
    out = poison(T, H, D, dtype=dtype)
    torch.ops.gemma4rt.head_norm_rope(x, w, 1e-6, cos, sin, out)
    assert_close(out, ref.head_norm_rope(x, w, 1e-6, cos, sin), dtype, "head_norm_rope")
    assert_close(rope.head_norm_rope(x, w, 1e-6, cos, sin), ref.head_norm_rope(x, w, 1e-6, cos, sin), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 704), (37, 2112), (6, 100), (3, 37)])
def test_gelu_tanh_and_mul(dtype, T, I):
    x = torch.randn(T, 2 * I, device=DEV, dtype=dtype) * 3
    out = poison(T, I, dtype=dtype)
    torch.ops.gemma4rt.gelu_tanh_and_mul(x, out)
    assert_close(out, ref.gelu_tanh_and_mul(x), dtype, "gelu_tanh_and_mul")
    assert_close(activation.gelu_tanh_and_mul(x), ref.gelu_tanh_and_mul(x), dtype)


def test_opcheck():
    d = torch.bfloat16
    x, r = torch.randn(4, 256, device=DEV, dtype=d), torch.randn(4, 256, device=DEV, dtype=d)
    w = torch.randn(256, device=DEV, dtype=d)
    o1, o2 = torch.empty_like(x), torch.empty_like(x)
    torch.library.opcheck(torch.ops.gemma4rt.rms_norm.default, (x, w, 1e-6, o1))
    torch.library.opcheck(torch.ops.gemma4rt.add_rms_norm.default, (x, r, w, 1e-6, o1, o2))
    torch.library.opcheck(torch.ops.gemma4rt.norm_add_scale.default, (x, r, w, torch.ones(1, device=DEV), 1e-6, o1))
    torch.library.opcheck(torch.ops.gemma4rt.gelu_tanh_and_mul.default, (x, torch.empty(4, 128, device=DEV, dtype=d)))
    torch.library.opcheck(torch.ops.gemma4rt.norm_add_scale_norm.default,
                          (x, r, w, torch.ones(1, device=DEV), w, 1e-6, o1, o2))
    torch.library.opcheck(torch.ops.gemma4rt.gelu_tanh_mul.default, (x, r, torch.empty_like(x)))
    o3, o4 = torch.empty_like(x), torch.empty_like(x)
    torch.library.opcheck(torch.ops.gemma4rt.norm_add_scale_norm3.default,
                          (x, r, w, None, w, w, w, 1e-6, o1, o2, o3, o4))
    torch.library.opcheck(torch.ops.gemma4rt.moe_block_end.default,
                          (x, r, x, w, w, w, torch.ones(1, device=DEV), w, 1e-6, o1, o2))
    q = torch.randn(3, 2, 256, device=DEV, dtype=d)
    cos, sin = torch.rand(3, 128, device=DEV), torch.rand(3, 128, device=DEV)
    torch.library.opcheck(torch.ops.gemma4rt.head_norm_rope.default, (q, w, 1e-6, cos, sin, torch.empty_like(q)))


def test_cuda_graph_replay():
    d = torch.bfloat16
    x, r = torch.randn(9, 2816, device=DEV, dtype=d), torch.randn(9, 2816, device=DEV, dtype=d)
    w = torch.randn(2816, device=DEV, dtype=d)
    sc = torch.tensor([0.5], device=DEV)
    q = torch.randn(9, 4, 256, device=DEV, dtype=d)
    cos, sin = torch.rand(9, 128, device=DEV), torch.rand(9, 128, device=DEV)
    gu = torch.randn(9, 1408, device=DEV, dtype=d)
    xm = torch.randn(9, 2816, device=DEV, dtype=d)

    def fn():
        y, res = norm.add_rms_norm(x, r, w, 1e-6)
        return y, res, norm.norm_add_scale(x, r, w, sc, 1e-6), rope.head_norm_rope(q, w[:256], 1e-6, cos, sin), \
            activation.gelu_tanh_and_mul(gu), norm.norm_add_scale_norm(x, r, w, sc, w, 1e-6), \
            activation.gelu_tanh_mul(gu[:, :704], gu[:, 704:]), \
            norm.moe_block_end(x, r, xm, w, w, w, sc, w, 1e-6), norm.norm_add_scale_norm3(x, r, w, sc, w, w, w, 1e-6)

    def refill():
        for t in (x, r, q, gu, xm):
            t.copy_(torch.randn_like(t))
        cos.copy_(torch.rand_like(cos))

    y, res, nas, hq, act, (h2, n2), act2, (mh, my), n3 = graph_replay(fn, None, refill)
    ey, er = ref.add_rms_norm(x, r, w, 1e-6)
    assert_close(y, ey, d, "graph y")
    assert_close(res, er, d, "graph residual")
    assert_close(nas, ref.norm_add_scale(x, r, w, sc, 1e-6), d, "graph norm_add_scale")
    assert_close(hq, ref.head_norm_rope(q, w[:256], 1e-6, cos, sin), d, "graph head_norm_rope")
    assert_close(act, ref.gelu_tanh_and_mul(gu), d, "graph gelu")
    eh = ref.norm_add_scale(x, r, w, sc, 1e-6)
    assert_close(h2, eh, d, "graph norm_add_scale_norm")
    assert_close(n2, ref.rms_norm(eh, w, 1e-6), d, "graph norm_add_scale_norm normed")
    assert_close(act2, ref.gelu_tanh_mul(gu[:, :704], gu[:, 704:]), d, "graph gelu_tanh_mul")
    emh, emy = ref.moe_block_end(x, r, xm, w, w, w, sc, w, 1e-6)
    assert_close(mh, emh, d, "graph moe_block_end")
    assert_close(my, emy, d, "graph moe_block_end normed")
    for i, t in enumerate(n3):
        assert_close(t, eh if i == 0 else ref.rms_norm(eh, w, 1e-6), d, "graph norm_add_scale_norm3")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,KVH,D", [(1, 8, 1, 256), (7, 16, 8, 256), (5, 32, 4, 512), (3, 6, 2, 72)])
def test_qkv_norm_rope_store_equals_separate_ops(dtype, T, H, KVH, D):
    """The fused launch = head_norm_rope(q), head_norm_rope(k) and the v-norm stored by store_kv, bit for bit
    (the same device code per head), on q/k/v that are strided views of one fused projection output, with
    one token's slot negative (not stored)."""
    S, P = 16, 4
    qkv = torch.randn(T, (H + 2 * KVH) * D + 8, device=DEV, dtype=dtype) * 3
    q = qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + KVH) * D].view(T, KVH, D)
    v = qkv[:, (H + KVH) * D:(H + 2 * KVH) * D].view(T, KVH, D)
    qw, kw = torch.randn(D, device=DEV, dtype=dtype), torch.randn(D, device=DEV, dtype=dtype)
    cos, sin = torch.randn(T, D // 2, device=DEV), torch.randn(T, D // 2, device=DEV)
    slots = torch.randperm(P * S, device=DEV)[:T].long()
    slots[T // 2] = -1
    kc, vc = poison(P, S, KVH, D, dtype=dtype), poison(P, S, KVH, D, dtype=dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    out = rope.qkv_norm_rope_store(q, k, v, qw, kw, 1e-6, cos, sin, kc, vc, slots)
    want_q = rope.head_norm_rope(q, qw, 1e-6, cos, sin)
    from gemma4rt.ops.attention import store_kv
    store_kv(rope.head_norm_rope(k, kw, 1e-6, cos, sin), rope.head_norm_rope(v, None, 1e-6, None, None), kc2, vc2,
             slots)
    assert torch.equal(out, want_q)
    assert torch.equal(kc.nan_to_num(7.0), kc2.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0), vc2.nan_to_num(7.0))
    # against the fp32 reference as well
    assert_close(out, ref.head_norm_rope(q, qw, 1e-6, cos, sin), dtype, "q")


def test_qkv_norm_rope_store_opcheck_and_graph():
    d, T, H, KVH, D = torch.bfloat16, 4, 8, 2, 256
    q = torch.randn(T, H, D, device=DEV, dtype=d)
    k = torch.randn(T, KVH, D, device=DEV, dtype=d)
    v = torch.randn(T, KVH, D, device=DEV, dtype=d)
    qw, kw = torch.randn(D, device=DEV, dtype=d), torch.randn(D, device=DEV, dtype=d)
    cos, sin = torch.randn(T, D // 2, device=DEV), torch.randn(T, D // 2, device=DEV)
    kc, vc = torch.zeros(2, 16, KVH, D, device=DEV, dtype=d), torch.zeros(2, 16, KVH, D, device=DEV, dtype=d)
    slots = torch.tensor([0, 5, 17, 31], device=DEV)
    torch.library.opcheck(torch.ops.gemma4rt.qkv_norm_rope_store.default,
                          (q, k, v, qw, kw, 1e-6, cos, sin, kc, vc, slots, torch.empty_like(q)))
    out = graph_replay(lambda: rope.qkv_norm_rope_store(q, k, v, qw, kw, 1e-6, cos, sin, kc, vc, slots), None,
                       lambda: (q.copy_(torch.randn_like(q)), k.copy_(torch.randn_like(k))))
    assert torch.equal(out, rope.head_norm_rope(q, qw, 1e-6, cos, sin))
    assert torch.equal(kc.view(32, KVH, D)[slots], rope.head_norm_rope(k, kw, 1e-6, cos, sin))
