"""Native MoE router, alignment and experts vs the references (small-batch weight-streaming tiles and
64-row tiles, odd token counts, the 26B-A4B geometry, poisoned outputs, opcheck, graph replay)."""
import pytest
import torch

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_util import require_native, require_op  # noqa: E402

require_native()
require_op("moe_experts")

from gpu_util import DEV, HALF, assert_close, graph_replay  # noqa: E402
from gemma4rt.ops import moe  # noqa: E402
from gemma4rt.ops import reference as ref  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (37, 128, 8), (5, 16, 4), (300, 64, 2)])
def test_route(dtype, T, E, k):
    # distinct values exactly representable in every dtype (no ties to break differently), strided rows
    base = torch.stack([torch.randperm(E, device=DEV) for _ in range(T)]).float() * 0.0625 - E * 0.03
    logits = torch.cat([base, torch.zeros(T, 3, device=DEV)], 1).to(dtype)[:, :E]
    scale = torch.rand(E, device=DEV) + 0.5
    for sc in (scale, None):
        w = torch.full((T, k), float("nan"), device=DEV)
        ids = torch.full((T, k), -7, dtype=torch.int32, device=DEV)
        torch.ops.gemma4rt.moe_route(logits, k, sc, w, ids)
        ew, eids = ref.moe_route(logits, k, sc)
        # same experts, same order (descending probability), same weights
        assert torch.equal(ids, eids), (ids, eids)
        torch.testing.assert_close(w, ew, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T", [1, 8, 64, 33, 700])
def test_align(T):
    E, k = 128, 8
    ids = torch.stack([torch.randperm(E, device=DEV)[:k] for _ in range(T)]).to(torch.int32)
    bm = moe.moe_block_m(T, k, E)
    cap = (T * k) // bm + min(E, T * k)
    srt = torch.full((cap * bm,), -9, dtype=torch.int32, device=DEV)
    te = torch.full((cap,), -9, dtype=torch.int32, device=DEV)
    nt = torch.zeros(1, dtype=torch.int32, device=DEV)
    torch.ops.gemma4rt.moe_align(ids, E, bm, srt, te, nt)
    n = int(nt.item())
    counts = torch.bincount(ids.flatten().long(), minlength=E)
    assert n == int(((counts + bm - 1) // bm).sum())
    flat = ids.flatten()
    got = srt[: n * bm].view(n, bm)
    for t in range(n):
        e = int(te[t])
        rows = got[t][got[t] >= 0]
        assert rows.numel() > 0 and bool((flat[rows.long()] == e).all())
    valid = srt[srt >= 0].sort().values
    assert torch.equal(valid, torch.arange(T * k, device=DEV, dtype=torch.int32))  # each pair exactly once


def _experts_case(T, E, k, d, I, dtype, strided=False):
    x = torch.randn(T, d + (8 if strided else 0), device=DEV, dtype=dtype)[:, :d]
    gate_up = (torch.randn(E, 2 * I, d, device=DEV) / d ** 0.5).to(dtype)
    down = (torch.randn(E, d, I, device=DEV) / I ** 0.5).to(dtype)
    logits = torch.randn(T, E, device=DEV)
    w, ids = ref.moe_route(logits, k, torch.rand(E, device=DEV) + 0.5)
    return x, gate_up, down, w, ids


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("T,E,k,d,I", [(1, 16, 4, 256, 96), (5, 16, 4, 264, 104), (37, 8, 2, 128, 64),
                                       (300, 8, 4, 256, 96), (1, 128, 8, 2816, 704), (64, 128, 8, 2816, 704),
                                       (1, 128, 8, 2816, 352), (64, 128, 8, 2816, 352)])   # 352: a --tp 2 shard
@pytest.mark.parametrize("entry", [True, False], ids=["default", "tiles"])
def test_experts(monkeypatch, dtype, T, E, k, d, I, entry):
    monkeypatch.setattr(moe, "ENTRY_GEMV", entry)      # False: the tile kernels at every batch size
    torch.manual_seed(T + E)
    x, gu, dn, w, ids = _experts_case(T, E, k, d, I, dtype, strided=(T % 2 == 1))
    out = moe.moe_experts(x, gu, dn, w, ids)
    exp = ref.moe_experts(x.float(), gu.float(), dn.float(), w, ids).to(dtype)
    assert_close(out, exp, dtype, f"moe T={T}", rel=2e-2)


def test_experts_poisoned_buffers():
    """Every output row and every used buffer entry is written by the kernels."""
    dtype = torch.bfloat16
    T, E, k, d, I = 9, 16, 4, 256, 96
    x, gu, dn, w, ids = _experts_case(T, E, k, d, I, dtype)
    bm = moe.moe_block_m(T, k, E)
    cap = (T * k) // bm + min(E, T * k)
    srt = torch.empty(cap * bm, dtype=torch.int32, device=DEV)
    te = torch.empty(cap, dtype=torch.int32, device=DEV)
    nt = torch.empty(1, dtype=torch.int32, device=DEV)
    torch.ops.gemma4rt.moe_align(ids.int(), E, bm, srt, te, nt)
    hbuf = torch.full((cap * bm, I), float("nan"), dtype=dtype, device=DEV)
    ybuf = torch.full((T * k, d), float("nan"), device=DEV)
    out = torch.full((T, d), float("nan"), dtype=dtype, device=DEV)
    torch.ops.gemma4rt.moe_experts(x.contiguous(), gu, dn, w, srt, te, nt, bm, out, hbuf, ybuf)
    assert torch.isfinite(ybuf).all()
    exp = ref.moe_experts(x.float(), gu.float(), dn.float(), w, ids).to(dtype)
    assert_close(out, exp, dtype, "moe poisoned", rel=2e-2)
    torch.library.opcheck(torch.ops.gemma4rt.moe_experts.default, (x.contiguous(), gu, dn, w, srt, te, nt, bm, out, hbuf, ybuf))
    torch.library.opcheck(torch.ops.gemma4rt.moe_align.default, (ids.int(), E, bm, srt, te, nt))
    torch.library.opcheck(torch.ops.gemma4rt.moe_route.default,
                          (torch.randn(T, E, device=DEV), k, None, torch.empty(T, k, device=DEV),
                           torch.empty(T, k, dtype=torch.int32, device=DEV)))


def _routed_graph_check(x, gu, dn, k, dtype, label):
    """Routing + experts captured in a CUDA graph, replayed on new inputs and new routing (different
    experts active), against the fp32 reference."""
    T, E = x.shape[0], gu.shape[0]
    logits = torch.randn(T, E, device=DEV)
    scale = torch.rand(E, device=DEV) + 0.5

    def fn():
        w, ids = moe.moe_route(logits, k, scale)
        return moe.moe_experts(x, gu, dn, w, ids)

    def refill():
        x.copy_(torch.randn_like(x))
        logits.copy_(torch.randn_like(logits) * 3)

    out = graph_replay(fn, None, refill)
    w, ids = ref.moe_route(logits, k, scale)
    assert_close(out, ref.moe_experts(x.float(), gu.float(), dn.float(), w, ids).to(dtype), dtype, label, rel=2e-2)


def test_cuda_graph_replay():
    dtype = torch.bfloat16
    T, E, k, d, I = 8, 128, 8, 2816, 704
    x, gu, dn, _, _ = _experts_case(T, E, k, d, I, dtype)
    _routed_graph_check(x, gu, dn, k, dtype, "moe graph")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("T,E,k,d,I", [(1, 16, 4, 256, 96), (3, 16, 4, 264, 104), (1, 128, 8, 2816, 704),
                                       (4, 128, 8, 2816, 704), (4, 128, 8, 2816, 352)])
def test_entry_gemv_mode(monkeypatch, dtype, T, E, k, d, I):
    """The entry mode (default; GEMMA4RT_MOE_GEMV=0 turns it off): up to 32 (token, slot) entries skip the
    alignment and run one skinny GEMV per entry (block_m 1). Against the fp32 reference and the tile kernels, poisoned buffers,
    strided input, opcheck, and a replayed CUDA graph with new routing."""
    torch.manual_seed(T + E + d)
    x, gu, dn, w, ids = _experts_case(T, E, k, d, I, dtype, strided=True)
    exp = ref.moe_experts(x.float(), gu.float(), dn.float(), w, ids).to(dtype)
    monkeypatch.setattr(moe, "ENTRY_GEMV", False)
    tiles = moe.moe_experts(x, gu, dn, w, ids)
    monkeypatch.setattr(moe, "ENTRY_GEMV", True)
    ids32 = ids.int().contiguous()
    hbuf = torch.full((T * k, I), float("nan"), dtype=dtype, device=DEV)
    ybuf = torch.full((T * k, d), float("nan"), device=DEV)
    out = torch.full((T, d), float("nan"), dtype=dtype, device=DEV)
    args = (x.contiguous(), gu, dn, w, ids32, ids32.view(-1)[:1], ids32.view(-1)[:1], 1, out, hbuf, ybuf)
    torch.ops.gemma4rt.moe_experts(*args)
    assert torch.isfinite(ybuf).all() and torch.isfinite(hbuf.float()).all()
    assert_close(out, exp, dtype, f"moe entry T={T}", rel=2e-2)
    assert_close(moe.moe_experts(x, gu, dn, w, ids), tiles, dtype, f"moe entry vs tiles T={T}", rel=2e-2)
    torch.library.opcheck(torch.ops.gemma4rt.moe_experts.default, args)
    with pytest.raises(RuntimeError):                     # entry mode needs the [T, k] ids
        torch.ops.gemma4rt.moe_experts(*args[:4], ids32.view(-1)[:-1], *args[5:])
    _routed_graph_check(x, gu, dn, k, dtype, "moe entry graph")
