"""Native skinny GEMM (csrc/gemm/gemv.cu) vs an fp32 matmul: 1-8 rows, odd column counts, strided rows,
poisoned outputs, opcheck, CUDA-graph replay, and the ops.linear switch. Both kernels: the tensor-core one
and the CUDA-core one, each forced (GEMMA4RT_GEMV_MMA=1 / 0, read at each launch), and the default choice
(CUDA cores for 1-2 rows, tensor cores for 3-8)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_util import require_native  # noqa: E402

require_native()

from gpu_util import DEV, graph_replay, poison  # noqa: E402
import importlib  # noqa: E402

lin = importlib.import_module("gemma4rt.ops.linear")   # the module (gemma4rt.ops.linear is also a function name)


def _ref(x, w):
    return (x.float() @ w.float().t())


@pytest.fixture(params=["mma", "cuda-cores", "default"])
def kernel(request, monkeypatch):
    if request.param == "default":
        monkeypatch.delenv("GEMMA4RT_GEMV_MMA", raising=False)
    else:
        monkeypatch.setenv("GEMMA4RT_GEMV_MMA", "1" if request.param == "mma" else "0")
    return request.param


@pytest.fixture(params=["mma", "cuda-cores"])
def one_kernel(request, monkeypatch):
    monkeypatch.setenv("GEMMA4RT_GEMV_MMA", "1" if request.param == "mma" else "0")
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("N,K", [(1, 8), (37, 1536), (2048, 2560), (333, 264), (6, 12288), (100, 640),
                                 (1536, 6152), (5376, 21504)])
def test_gemv_matches_fp32_matmul(kernel, dtype, M, N, K):
    """Shapes cover every K split of the tensor-core kernel (1, 2, 4, 8 warps per column group), a K that
    ends inside a 32-wide chunk (264, 6152), column counts that leave a partial group of 8."""
    big = torch.randn(M, K + 16, device=DEV, dtype=dtype)
    x = big[:, 8:8 + K]                                        # row stride K + 16, 16-byte aligned
    w = torch.randn(N, K, device=DEV, dtype=dtype) / K ** 0.5
    out = poison(M, N, dtype=dtype)
    torch.ops.gemma4rt.gemv(x, w, out)
    ref = _ref(x, w)
    err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), err
    assert lin.gemv_ok(x, w)


@pytest.mark.parametrize("M", [1, 2, 4, 8])
@pytest.mark.parametrize("N,K", [(37, 264), (2048, 1536), (512, 2560), (6, 12288), (20000, 256)])
@pytest.mark.parametrize("kern", [lin.CUDA_CORES, lin.TENSOR_CORES])
@pytest.mark.parametrize("glu", [False, True])
def test_gemv_w_static_preload_gives_the_same_bits(M, N, K, kern, glu, monkeypatch):
    """W_STATIC launches load the first weight vectors before waiting on the previous kernel (PDL): the sums
    keep their order, so the outputs equal those of the plain launch bit for bit, with K shorter than the
    preload (264), covered by it (1536), longer (2560, 12288), and a grid past the preload's column limit
    (20000); inside a captured graph too. GEMMA4RT_GEMV_PRELOAD=0 turns the preload off."""
    d = torch.bfloat16
    x = torch.randn(M, K, device=DEV, dtype=d)
    w = torch.randn((2 if glu else 1) * N, K, device=DEV, dtype=d) / K ** 0.5
    op = torch.ops.gemma4rt.gemv_gelu_mul if glu else torch.ops.gemma4rt.gemv
    plain, pre = poison(M, N, dtype=d), poison(M, N, dtype=d)
    op(x, w, plain, kern)
    op(x, w, pre, kern | lin.W_STATIC)
    assert torch.equal(pre, plain)
    monkeypatch.setenv("GEMMA4RT_GEMV_PRELOAD", "0")
    off = poison(M, N, dtype=d)
    op(x, w, off, kern | lin.W_STATIC)
    assert torch.equal(off, plain)
    monkeypatch.delenv("GEMMA4RT_GEMV_PRELOAD")

    def step():
        out = torch.empty(M, N, device=DEV, dtype=d)
        op(x, w, out, kern | lin.W_STATIC)
        return out
    got = graph_replay(step, None, lambda: x.copy_(torch.randn_like(x)))
    want = poison(M, N, dtype=d)
    op(x, w, want, kern)
    assert torch.equal(got, want)


def test_gemv_rejects_what_it_cannot_do():
    x = torch.randn(9, 64, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(16, 64, device=DEV, dtype=torch.bfloat16)
    assert not lin.gemv_ok(x, w)                              # 9 rows
    assert not lin.gemv_ok(x[:2, :60], w[:, :60])             # K not a multiple of 8
    with pytest.raises(RuntimeError):
        torch.ops.gemma4rt.gemv(x, w, torch.empty(9, 16, device=DEV, dtype=torch.bfloat16))


def test_gemv_opcheck_and_graph_replay():
    d = torch.bfloat16
    x = torch.randn(4, 512, device=DEV, dtype=d)
    w = torch.randn(300, 512, device=DEV, dtype=d)
    torch.library.opcheck(torch.ops.gemma4rt.gemv.default, (x, w, torch.empty(4, 300, device=DEV, dtype=d)))
    out = graph_replay(lambda: lin.gemv(x, w), None, lambda: x.copy_(torch.randn_like(x)))
    ref = _ref(x, w)
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2


def test_linear_switch(monkeypatch):
    import torch.nn.functional as F
    w = torch.randn(100, 256, device=DEV, dtype=torch.bfloat16)   # (not written by the kernel just before linear:
    x = torch.randn(3, 256, device=DEV, dtype=torch.bfloat16)     # linear's launches read w before their PDL wait)
    monkeypatch.setattr(lin, "GEMV_ENABLED", True)
    assert torch.equal(lin.linear(x, w), lin.gemv(x, w))
    x9 = torch.randn(9, 256, device=DEV, dtype=torch.bfloat16)
    assert torch.equal(lin.linear(x9, w), F.linear(x9, w))          # more rows: torch's GEMM
    monkeypatch.setattr(lin, "GEMV_ENABLED", False)
    assert torch.equal(lin.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("I,K", [(6144, 1536), (37, 264), (1, 8), (2816, 5376)])
def test_gemv_gelu_mul_matches_reference(kernel, M, I, K):
    d = torch.bfloat16
    big = torch.randn(M, K + 8, device=DEV, dtype=d)
    x = big[:, :K]                                             # strided rows
    w = torch.randn(2 * I, K, device=DEV, dtype=d) / K ** 0.5
    out = poison(M, I, dtype=d)
    torch.ops.gemma4rt.gemv_gelu_mul(x, w, out)
    g, u = _ref(x, w).split(I, dim=1)
    ref = torch.nn.functional.gelu(g.to(d).float(), approximate="tanh") * u.to(d).float()
    err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    assert err < 1.5e-2, err
    # the unfused native path (gemv, then gelu-and-mul) gives the same numbers up to one rounding
    from gemma4rt import ops
    unfused = ops.gelu_tanh_and_mul(lin.gemv(x, w))
    assert ((out.float() - unfused.float()).abs() <= 1e-2 * unfused.float().abs() + 1e-3).all()
    with pytest.raises(RuntimeError):                          # w must have 2 * I rows
        torch.ops.gemma4rt.gemv_gelu_mul(x, w[:-1], out)


def test_gemv_gelu_mul_opcheck_graph_and_switch(monkeypatch):
    d = torch.bfloat16
    x = torch.randn(2, 512, device=DEV, dtype=d)
    w = torch.randn(600, 512, device=DEV, dtype=d) / 512 ** 0.5
    torch.library.opcheck(torch.ops.gemma4rt.gemv_gelu_mul.default, (x, w, torch.empty(2, 300, device=DEV, dtype=d)))
    out = graph_replay(lambda: lin.linear_gelu_mul(x, w), None, lambda: x.copy_(torch.randn_like(x)))
    from gemma4rt import ops
    want = ops.gelu_tanh_and_mul(torch.nn.functional.linear(x, w))
    assert ((out.float() - want.float()).abs() <= 2e-2 * want.float().abs() + 2e-3).all()
    monkeypatch.setattr(lin, "GEMV_ENABLED", False)
    assert torch.equal(lin.linear_gelu_mul(x, w), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K", [(37, 1536), (2048, 2560), (333, 264), (6, 12288), (100, 640), (1, 8)])
def test_gemv_rows_are_independent(one_kernel, dtype, N, K):
    """With one kernel forced, each output row is a function of its own x row only, bit for bit, whatever
    the number of rows (1-8): speculative verification of k + 1 rows then gives the logits of k + 1
    single-row decode steps. Plain and
    fused gate/up + gelu-mul, strided rows, and inside a replayed CUDA graph."""
    big = torch.randn(8, K + 16, device=DEV, dtype=dtype)
    x = big[:, 8:8 + K]
    w = torch.randn(N, K, device=DEV, dtype=dtype) / K ** 0.5
    w2 = torch.randn(2 * N, K, device=DEV, dtype=dtype) / K ** 0.5
    single = [lin.gemv(x[i:i + 1], w) for i in range(8)]
    single_glu = []
    for i in range(8):
        o = poison(1, N, dtype=dtype)
        torch.ops.gemma4rt.gemv_gelu_mul(x[i:i + 1], w2, o)
        single_glu.append(o)
    for M in range(2, 9):
        got, got_glu = poison(M, N, dtype=dtype), poison(M, N, dtype=dtype)
        torch.ops.gemma4rt.gemv(x[:M], w, got)
        torch.ops.gemma4rt.gemv_gelu_mul(x[:M], w2, got_glu)
        assert torch.equal(got, torch.cat(single[:M])), M
        assert torch.equal(got_glu, torch.cat(single_glu[:M])), M
    x4 = x[:4]
    out = graph_replay(lambda: lin.gemv(x4, w), None, lambda: x4.copy_(torch.randn_like(x4)))
    assert torch.equal(out, torch.cat([lin.gemv(x4[i:i + 1], w) for i in range(4)]))


@pytest.mark.parametrize("M", [1, 2, 3, 8])
@pytest.mark.parametrize("N,K", [(256, 1536), (37, 264), (1, 8), (256, 2560)])
def test_gemv_gelu_aux_equals_the_unfused_ops(kernel, M, N, K):
    """gelu_tanh(x·Wᵀ) · aux in one launch (E2B/E4B's per-layer-input gate): the bits of the GEMV then
    gelu_tanh_mul, for each kernel, with strided x and aux rows (aux as the [T, L, P] per-layer inputs' slice)."""
    from gemma4rt import ops
    d = torch.bfloat16
    x = torch.randn(M, K + 8, device=DEV, dtype=d)[:, :K]
    w = torch.randn(N, K, device=DEV, dtype=d) / K ** 0.5
    aux = torch.randn(M, 3, N, device=DEV, dtype=d)[:, 1]              # row stride 3N
    out = poison(M, N, dtype=d)
    torch.ops.gemma4rt.gemv_gelu_aux(x, w, aux, out)
    assert torch.equal(out, ops.gelu_tanh_mul(lin.gemv(x, w), aux))
    ref = torch.nn.functional.gelu(_ref(x, w).to(d).float(), approximate="tanh") * aux.float()
    assert ((out.float() - ref).abs() <= 2e-2 * ref.abs() + 2e-2).all()
    assert torch.equal(lin.linear_gelu_aux(x, w, aux), out)
    with pytest.raises(RuntimeError):                          # aux must be [M, N]
        torch.ops.gemma4rt.gemv_gelu_aux(x, w, aux[:, :-1], out)


def test_gemv_gelu_aux_opcheck_graph_and_fallback(monkeypatch):
    from gemma4rt import ops
    d = torch.bfloat16
    x = torch.randn(2, 512, device=DEV, dtype=d)
    w = torch.randn(300, 512, device=DEV, dtype=d) / 512 ** 0.5
    aux = torch.randn(2, 300, device=DEV, dtype=d)
    torch.library.opcheck(torch.ops.gemma4rt.gemv_gelu_aux.default, (x, w, aux, torch.empty(2, 300, device=DEV, dtype=d)))
    out = graph_replay(lambda: lin.linear_gelu_aux(x, w, aux), None, lambda: x.copy_(torch.randn_like(x)))
    assert torch.equal(out, ops.gelu_tanh_mul(lin.gemv(x, w), aux))
    monkeypatch.setattr(lin, "GEMV_ENABLED", False)            # cuBLAS, then the separate gelu-mul
    assert torch.equal(lin.linear_gelu_aux(x, w, aux), ops.gelu_tanh_mul(torch.nn.functional.linear(x, w), aux))
    x9 = torch.randn(9, 512, device=DEV, dtype=d)              # more rows than the skinny GEMM takes
    aux9 = torch.randn(9, 300, device=DEV, dtype=d)
    assert torch.equal(lin.linear_gelu_aux(x9, w, aux9), ops.gelu_tanh_mul(torch.nn.functional.linear(x9, w), aux9))


@pytest.mark.parametrize("M", [1, 2, 3, 8])
@pytest.mark.parametrize("N,K", [(1536, 2048), (2560, 264), (3840, 4096), (5376, 1536), (8, 8)])
@pytest.mark.parametrize("scale,norms", [(True, 1), (False, 0), (True, 0), (False, 3), (True, 3)])
def test_gemv_norm_equals_the_unfused_ops(kernel, M, N, K, scale, norms):
    """A projection and the norms after it in one launch (the last CTA normalises): y, h and the next norm(s) are
    bit for bit those of gemv then norm_add_scale[_norm | _norm3] (norms: 0, 1 or the MoE block's 3 norms of h),
    for each kernel and the norm kernel's thread counts (N = 1536: 128 threads a row, 2560 / 3840: 256, 5376:
    512); strided x and residual rows; the counter is left zero, so back-to-back launches work."""
    from gemma4rt import ops
    d = torch.bfloat16
    x = torch.randn(M, K + 8, device=DEV, dtype=d)[:, :K]
    w = torch.randn(N, K, device=DEV, dtype=d) / K ** 0.5
    res = torch.randn(M, N + 16, device=DEV, dtype=d)[:, 8:8 + N]
    w1 = torch.randn(N, device=DEV, dtype=d)
    wn = [torch.randn(N, device=DEV, dtype=d) for _ in range(norms)]
    sc = torch.tensor([0.7], device=DEV) if scale else None
    counter = torch.zeros(1, dtype=torch.int32, device=DEV)
    for _ in range(2):
        y, h = poison(M, N, dtype=d), poison(M, N, dtype=d)
        outs = [poison(M, N, dtype=d) for _ in wn]
        more = (wn[1], wn[2], outs[1], outs[2]) if norms == 3 else ()
        torch.ops.gemma4rt.gemv_norm(x, w, res, w1, sc, wn[0] if wn else None, 1e-6, y, h,
                                     outs[0] if outs else None, counter, 0, *more)
        assert int(counter.item()) == 0
        want_y = lin.gemv(x, w)
        assert torch.equal(y, want_y)
        if norms == 3:
            want_h, *want = ops.norm_add_scale_norm3(want_y, res, w1, sc, *wn, 1e-6)
        elif norms == 1:
            want_h, *want = ops.norm_add_scale_norm(want_y, res, w1, sc, wn[0], 1e-6)
        else:
            want_h, want = ops.norm_add_scale(want_y, res, w1, sc, 1e-6), []
        assert torch.equal(h, want_h)
        assert len(outs) == len(want) and all(torch.equal(a, b) for a, b in zip(outs, want))


def test_gemv_norm_opcheck_graph_wrapper_and_errors(monkeypatch):
    from gemma4rt import ops
    d = torch.bfloat16
    x = torch.randn(2, 512, device=DEV, dtype=d)
    w = torch.randn(1536, 512, device=DEV, dtype=d) / 512 ** 0.5
    res = torch.randn(2, 1536, device=DEV, dtype=d)
    w1, w2 = torch.randn(1536, device=DEV, dtype=d), torch.randn(1536, device=DEV, dtype=d)
    sc = torch.tensor([1.3], device=DEV)
    counter = torch.zeros(1, dtype=torch.int32, device=DEV)
    args = (x, w, res, w1, sc, w2, 1e-6, torch.empty_like(res), torch.empty_like(res), torch.empty_like(res), counter)
    torch.library.opcheck(torch.ops.gemma4rt.gemv_norm.default, args)
    monkeypatch.setattr(lin, "FUSED_GEMV_NORM", True)
    lin.gemv_norm_counter(x.device)                    # made before the capture, as the CUDA graphs do
    h, n = graph_replay(lambda: lin.linear_norm_add_scale(x, w, res, w1, sc, w2, 1e-6), None,
                        lambda: x.copy_(torch.randn_like(x)))
    want_h, want_n = ops.norm_add_scale_norm(lin.gemv(x, w), res, w1, sc, w2, 1e-6)
    assert torch.equal(h, want_h) and torch.equal(n, want_n)
    h1, none = lin.linear_norm_add_scale(x, w, res, w1, None, None, 1e-6)
    assert none is None and torch.equal(h1, ops.norm_add_scale(lin.gemv(x, w), res, w1, None, 1e-6))
    x9 = torch.randn(9, 512, device=DEV, dtype=d)     # more rows than the skinny GEMM takes: the unfused ops
    r9 = torch.randn(9, 1536, device=DEV, dtype=d)
    got = lin.linear_norm_add_scale(x9, w, r9, w1, sc, w2, 1e-6)
    want = ops.norm_add_scale_norm(torch.nn.functional.linear(x9, w), r9, w1, sc, w2, 1e-6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # the MoE block's three norms (GEMMA4RT_FUSED_GEMV_NORM3) through the wrapper, in a graph, against the unfused ops
    w3, w4 = torch.randn(1536, device=DEV, dtype=d), torch.randn(1536, device=DEV, dtype=d)
    args3 = args + (0, w3, w4, torch.empty_like(res), torch.empty_like(res))
    torch.library.opcheck(torch.ops.gemma4rt.gemv_norm.default, args3)
    monkeypatch.setattr(lin, "FUSED_GEMV_NORM3", True)
    got3 = graph_replay(lambda: lin.linear_norm_add_scale_norm3(x, w, res, w1, None, w2, w3, w4, 1e-6), None,
                        lambda: x.copy_(torch.randn_like(x)))
    want3 = ops.norm_add_scale_norm3(lin.gemv(x, w), res, w1, None, w2, w3, w4, 1e-6)
    assert len(got3) == 4 and all(torch.equal(a, b) for a, b in zip(got3, want3))
    with pytest.raises(RuntimeError, match="w3"):      # a third norm without its output
        torch.ops.gemma4rt.gemv_norm(x, w, res, w1, None, w2, 1e-6, torch.empty_like(res), torch.empty_like(res),
                                     torch.empty_like(res), counter, 0, w3, None, None, None)
    with pytest.raises(RuntimeError):                  # N not a multiple of 8: refused, not miscomputed
        w7 = torch.randn(1535, 512, device=DEV, dtype=d)
        r7 = torch.randn(2, 1535, device=DEV, dtype=d)
        torch.ops.gemma4rt.gemv_norm(x, w7, r7, w1[:-1], None, None, 1e-6, torch.empty_like(r7),
                                     torch.empty_like(r7), None, counter)


def _qkv_case(M, H, KVH, D, k_eq_v, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    d, K, P, S = torch.bfloat16, 1536, 6, 16
    x = torch.randn(M, K, device=DEV, dtype=d, generator=g)
    w = torch.randn((H + (1 if k_eq_v else 2) * KVH) * D, K, device=DEV, dtype=d, generator=g) / K ** 0.5
    qw = 1 + 0.1 * torch.randn(D, device=DEV, dtype=d, generator=g)
    kw = 1 + 0.1 * torch.randn(D, device=DEV, dtype=d, generator=g)
    ang = torch.rand(M, D // 2, device=DEV, generator=g) * 6.0
    slots = torch.randperm(P * S, device=DEV, generator=g)[:M].to(torch.int64)
    if M > 1:
        slots[1] = -1                                        # a row whose k / v are not stored
    caches = torch.randn(2, P, S, KVH, D, device=DEV, dtype=d, generator=g)
    return x, w, qw, kw, ang.cos(), ang.sin(), slots, caches


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("H,KVH,D,k_eq_v", [(8, 1, 256, False), (16, 8, 256, False), (32, 4, 512, True),
                                            (4, 2, 512, False)])
@pytest.mark.parametrize("kern", [lin.CUDA_CORES, lin.TENSOR_CORES, lin.CUDA_CORES | lin.W_STATIC,
                                  lin.TENSOR_CORES | lin.W_STATIC])
def test_gemv_qkv_norm_rope_store_equals_the_two_ops(M, H, KVH, D, k_eq_v, kern):
    """The q/k/v projection with qkv_norm_rope_store run by each head's last CTA: y, q_out and both caches (every
    slot, stored or not) equal those of gemv then qkv_norm_rope_store bit for bit; shapes of E2B's sliding layers,
    the 26B-A4B's / 12B's, a full layer whose V is K, and a small one; every head's counter slot is left zero."""
    x, w, qw, kw, cos, sin, slots, caches = _qkv_case(M, H, KVH, D, k_eq_v)
    N = w.shape[0]
    eps = 1e-6
    y_ref = poison(M, N, dtype=x.dtype)
    torch.ops.gemma4rt.gemv(x, w, y_ref, kern & 3)
    q_ref = poison(M, H, D, dtype=x.dtype)
    kc_ref, vc_ref = caches[0].clone(), caches[1].clone()
    k = y_ref[:, H * D:(H + KVH) * D].view(M, KVH, D)
    v = k if k_eq_v else y_ref[:, (H + KVH) * D:].view(M, KVH, D)
    torch.ops.gemma4rt.qkv_norm_rope_store(y_ref[:, :H * D].view(M, H, D), k, v, qw, kw, eps, cos, sin, kc_ref,
                                           vc_ref, slots, q_ref)
    kc, vc = caches[0].clone(), caches[1].clone()
    y, q = poison(M, N, dtype=x.dtype), poison(M, H, D, dtype=x.dtype)
    counter = torch.zeros(N // D, dtype=torch.int32, device=DEV)      # a slot a head of y
    torch.ops.gemma4rt.gemv_qkv_norm_rope_store(x, w, qw, kw, eps, cos, sin, kc, vc, slots, y, q, counter, kern)
    assert torch.equal(y, y_ref) and torch.equal(q, q_ref)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert torch.count_nonzero(counter) == 0


def test_linear_qkv_norm_rope_store_wrapper_graph_and_errors(monkeypatch):
    """ops.linear_qkv_norm_rope_store with GEMMA4RT_FUSED_QKV_ROPE on equals it off (the GEMV, then the
    separate kernel), inside a replayed CUDA graph with fresh x too; the op refuses a counter with fewer slots
    than y has heads, and a w whose rows fit neither layout (a RuntimeError, not a crash)."""
    from gemma4rt import ops
    from gemma4rt.ops import _native
    assert _native.has_op("gemv_qkv_norm_rope_store")         # else both runs below would take the two-op path
    H, KVH, D, M = 8, 1, 256, 2
    x, w, qw, kw, cos, sin, slots, caches = _qkv_case(M, H, KVH, D, False, seed=1)

    def run(fused):
        monkeypatch.setattr(lin, "FUSED_QKV_ROPE", fused)
        kc, vc = caches[0].clone(), caches[1].clone()
        return ops.linear_qkv_norm_rope_store(x, w, H, D, qw, kw, 1e-6, cos, sin, kc, vc, slots), kc, vc

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)
    monkeypatch.setattr(lin, "FUSED_QKV_ROPE", True)
    lin.gemv_norm_counter(x.device)                   # made before the capture, as the CUDA graphs do
    kc, vc = caches[0].clone(), caches[1].clone()
    q = graph_replay(lambda: ops.linear_qkv_norm_rope_store(x, w, H, D, qw, kw, 1e-6, cos, sin, kc, vc, slots),
                     None, lambda: x.copy_(torch.randn_like(x)))
    monkeypatch.setattr(lin, "FUSED_QKV_ROPE", False)
    kc2, vc2 = caches[0].clone(), caches[1].clone()
    q2 = ops.linear_qkv_norm_rope_store(x, w, H, D, qw, kw, 1e-6, cos, sin, kc2, vc2, slots)
    assert torch.equal(q, q2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    with pytest.raises(RuntimeError, match="slots"):      # a counter slot short of y's heads
        torch.ops.gemma4rt.gemv_qkv_norm_rope_store(x, w, qw, kw, 1e-6, cos, sin, caches[0].clone(),
                                                    caches[1].clone(), slots, poison(M, w.shape[0], dtype=x.dtype),
                                                    poison(M, H, D, dtype=x.dtype),
                                                    torch.zeros(H + 2 * KVH - 1, dtype=torch.int32, device=DEV), 0)
    with pytest.raises(RuntimeError):
        counter = torch.zeros(H + 2 * KVH, dtype=torch.int32, device=DEV)
        torch.ops.gemma4rt.gemv_qkv_norm_rope_store(x, w[:-8], qw, kw, 1e-6, cos, sin, caches[0].clone(),
                                                    caches[1].clone(), slots, poison(M, w.shape[0] - 8,
                                                                                     dtype=x.dtype),
                                                    poison(M, H, D, dtype=x.dtype), counter, 0)

