"""Native store_kv and paged attention vs the references: decode (q_len 1–8, GQA up to 16, split-KV
with merge), prefill (varlen, causal, sliding window, image blocks, cached prefix = chunked
prefill), head dims 256/512, bf16/fp16, poisoned outputs, opcheck, CUDA-graph replay."""
import pytest
import torch

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_util import require_native, require_op  # noqa: E402

require_native()
require_op("paged_attention")

from gpu_util import DEV, HALF, assert_close, graph_replay, poison  # noqa: E402
from gemma4rt.ops import attention  # noqa: E402
from gemma4rt.ops import reference as ref  # noqa: E402


def make_batch(q_lens, seq_lens, H, KVH, D, dtype, S=16, strided_q=False, extra_pages=5, block=False, reserve=0):
    """reserve: slots per request allocated beyond seq_lens (for tokens stored later)."""
    B = len(q_lens)
    pages_per = [-(-(L + reserve) // S) for L in seq_lens]
    P = sum(pages_per) + extra_pages
    perm = torch.randperm(P, device=DEV).to(torch.int32)
    width = max(pages_per) + 2
    table = torch.zeros(B, width, dtype=torch.int32, device=DEV)
    o = 0
    for b, n in enumerate(pages_per):
        table[b, :n] = perm[o:o + n]
        o += n
    kc = torch.randn(P, S, KVH, D, device=DEV, dtype=dtype)
    vc = torch.randn(P, S, KVH, D, device=DEV, dtype=dtype)
    T = sum(q_lens)
    if strided_q:
        q = torch.randn(T, H + 2 * KVH, D, device=DEV, dtype=dtype)[:, :H]  # slice of a fused qkv
    else:
        q = torch.randn(T, H, D, device=DEV, dtype=dtype)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=DEV)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    bids = None
    if block:  # one image block in the middle of each request's chunk
        bids = torch.full((T,), -1, dtype=torch.int32, device=DEV)
        for b in range(B):
            n = q_lens[b]
            if n >= 6:
                s0 = int(cu[b]) + n // 3
                bids[s0:s0 + n // 3] = b
    return q, kc, vc, table, cu, sl, bids


def run_native(q, kc, vc, table, cu, sl, window, bids, plan):
    T, H, D = q.shape
    out = poison(T, H, D, dtype=q.dtype)
    ws_o, ws_lse = attention.attention_workspace(plan, T, H, D, q.device)
    if plan.num_splits > 1:
        ws_o.fill_(float("nan"))
        ws_lse.fill_(float("nan"))
    return attention.paged_attention_planned(q, kc, vc, table, cu, sl, window, bids, 1.0, plan, out, ws_o, ws_lse)


def check(q, kc, vc, table, cu, sl, window, bids, dtype, forced_splits=None):
    """The plan's kernel against the reference; a step that runs decode tiles also through the other decode
    kernel (8-row tiles with the keys on the MMA's M side, 16-row tiles). Returns the default plan."""
    T, H, D = q.shape
    exp = ref.paged_attention(q, kc, vc, table, cu, sl, window, bids, 1.0)
    default = None
    for rows in (None, 8, 16):
        plan = attention.plan_attention(T, sl.numel(), H, kc.shape[2], table.shape[1] * kc.shape[1], window,
                                        decode_rows=rows)
        if default is None:
            default = plan
        elif plan.warps_m == 4 or plan == default:
            continue
        if forced_splits:
            span = table.shape[1] * kc.shape[1]
            ss = -(-span // forced_splits)
            ss = -(-ss // 32) * 32
            plan = attention.AttentionPlan(-(-span // ss), ss, plan.max_tiles, plan.warps_m)
        out = run_native(q, kc, vc, table, cu, sl, window, bids, plan)
        # scale 1.0 with unit-variance q/k gives peaky softmax: compare in fp32-reference terms
        assert_close(out, exp, dtype, f"attn plan={plan}", rel=2e-2 if dtype == torch.bfloat16 else 5e-3)
    return default


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [256, 512])
@pytest.mark.parametrize("H,KVH", [(8, 1), (16, 2), (4, 2), (16, 1)])
def test_decode(dtype, D, H, KVH):
    torch.manual_seed(D + H)
    seq = [37, 701, 5, 260]
    q, kc, vc, table, cu, sl, _ = make_batch([1] * 4, seq, H, KVH, D, dtype, strided_q=True)
    q = q / D ** 0.5  # keep softmax spread (scale is 1.0)
    for window in (None, 128):
        check(q, kc, vc, table, cu, sl, window, None, dtype)
        check(q, kc, vc, table, cu, sl, window, None, dtype, forced_splits=5)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [256, 512])
def test_decode_multi_query(dtype, D):
    """Speculative verification: q_len 2–8 per request."""
    torch.manual_seed(7)
    q, kc, vc, table, cu, sl, _ = make_batch([3, 8, 2], [300, 1025, 9], 16, 2, D, dtype)
    q = q / D ** 0.5
    for window in (None, 100):
        check(q, kc, vc, table, cu, sl, window, None, dtype)
        check(q, kc, vc, table, cu, sl, window, None, dtype, forced_splits=3)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D,H,KVH", [(256, 16, 8), (512, 16, 2), (256, 8, 1)])
def test_mixed_step(dtype, D, H, KVH):
    """A serving step: decode rows, a speculative row, then prompt chunks (one with an image block) in one
    launch, with the plan's split and forced splits."""
    torch.manual_seed(D + H + KVH)
    q_lens = [1] * 40 + [3] + [1] * 9 + [300, 77]
    seq = [int(x) for x in torch.randint(1, 1500, (50,))] + [300, 77 + 200]
    seq = [max(s, n) for s, n in zip(seq, q_lens)]
    q, kc, vc, table, cu, sl, _ = make_batch(q_lens, seq, H, KVH, D, dtype)
    q = q / D ** 0.5
    T = q.shape[0]
    bids = torch.full((T,), -1, dtype=torch.int32, device=DEV)
    bids[72:112] = 1
    for window, blocks in [(None, None), (512, None), (128, bids)]:
        check(q, kc, vc, table, cu, sl, window, blocks, dtype)
        check(q, kc, vc, table, cu, sl, window, blocks, dtype, forced_splits=4)


@pytest.mark.parametrize("fused_merge", [True, False])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D,H,KVH", [(256, 16, 8), (512, 16, 2), (256, 8, 1), (512, 16, 1)])
def test_mixed_step_two_launches(dtype, D, H, KVH, fused_merge, monkeypatch):
    """A mixed step as two launches (the one-token requests with the decode kernels, the others with 64-row
    tiles; q_sel): decode rows, a speculative row, a request without tokens, prompt chunks (one with an image
    block) and padded rows owned by no request. Each launch writes only its own requests' rows, also through its
    split merge (forced splits on both launches, partials poisoned with NaN; merged in the kernel or by the merge
    launch); padded rows come out zero; the in-kernel merge leaves its counters at zero."""
    from dataclasses import replace
    monkeypatch.setattr(attention, "FUSED_MERGE", fused_merge)
    torch.manual_seed(D + H + KVH + 3)
    q_lens = [1] * 30 + [3] + [1] * 9 + [300, 0, 77, 1]
    seq = [int(x) for x in torch.randint(1, 1500, (40,))] + [300, 5, 277, 900]
    seq = [max(s, n) for s, n in zip(seq, q_lens)]
    q, kc, vc, table, cu, sl, _ = make_batch(q_lens, seq, H, KVH, D, dtype)
    q = q / D ** 0.5
    T = q.shape[0]
    bids = torch.full((T,), -1, dtype=torch.int32, device=DEV)
    bids[T - 240:T - 200] = 1          # inside the 300-token chunk
    B, span = len(q_lens), table.shape[1] * kc.shape[1]
    qp = torch.cat([q, torch.randn(6, H, D, device=DEV, dtype=dtype)])      # 6 padded rows
    for window, blocks in [(None, None), (512, None), (128, bids)]:
        exp = ref.paged_attention(q, kc, vc, table, cu, sl, window, blocks, 1.0)
        bp = None if blocks is None else torch.cat([blocks, torch.full((6,), -1, dtype=torch.int32, device=DEV)])
        got = attention.paged_attention(qp, kc, vc, table, cu, sl, window, bp, 1.0, zero_out=True, mixed=True)
        assert_close(got[:T], exp, dtype, f"mixed window={window}", rel=2e-2 if dtype == torch.bfloat16 else 5e-3)
        assert torch.count_nonzero(got[T:]) == 0
        plans = [attention.plan_attention(T, B, H, KVH, span, window, head_dim=D, q_sel=s) for s in (1, 2)]
        assert plans[0].warps_m == (0 if H // KVH <= 8 and attention.DECODE8 else 1) and plans[1].warps_m == 4
        for splits in (None, 3):
            ss = -(-span // (splits or 1) // 32) * 32
            run = plans if splits is None else [replace(p, num_splits=-(-span // ss), split_size=ss) for p in plans]
            out = poison(T, H, D, dtype=dtype)
            ws_o, ws_lse = attention.attention_workspace(run, T, H, D, q.device)
            if ws_o.numel():
                ws_o.fill_(float("nan"))
                ws_lse.fill_(float("nan"))
            one = poison(T, H, D, dtype=dtype)
            attention.paged_attention_planned(q, kc, vc, table, cu, sl, window, blocks, 1.0, run[0], one, ws_o,
                                              ws_lse)
            single = torch.tensor([n == 1 for n in q_lens for _ in range(n)], device=DEV)
            # the decode launch alone leaves every other row as it was (poisoned)
            assert torch.isnan(one[~single]).all() and torch.isfinite(one[single]).all()
            for p in run:
                attention.paged_attention_planned(q, kc, vc, table, cu, sl, window, blocks, 1.0, p, out, ws_o, ws_lse)
            assert_close(out, exp, dtype, f"mixed window={window} plans={run}",
                         rel=2e-2 if dtype == torch.bfloat16 else 5e-3)
    if fused_merge:
        assert torch.count_nonzero(attention.merge_counters(q.device)) == 0


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D,H,KVH", [(256, 8, 1), (512, 8, 1), (256, 16, 8)])
def test_decode_tiles_with_prompt_rows(dtype, D, H, KVH):
    """Steps of at most DECODE_MAX_Q tokens per request on average run decode tiles, though one request may
    carry a prompt chunk far longer (decode rows beside a chunk with a cached prefix)."""
    torch.manual_seed(D + H + 1)
    for q_lens, seq in [([1, 14], [702, 34]), ([1] * 50 + [300], [int(x) for x in torch.randint(1, 1500, (50,))] + [700])]:
        seq = [max(s, n) for s, n in zip(seq, q_lens)]
        q, kc, vc, table, cu, sl, _ = make_batch(q_lens, seq, H, KVH, D, dtype)
        q = q / D ** 0.5
        for window in (None, 512, 100):
            plan = check(q, kc, vc, table, cu, sl, window, None, dtype)
            assert plan.warps_m == 1, plan
            check(q, kc, vc, table, cu, sl, window, None, dtype, forced_splits=3)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D,H,KVH", [(256, 8, 1), (512, 16, 2)])
def test_padded_rows_zero_out(dtype, D, H, KVH):
    """A mixed CUDA graph's step: tokens past cu_seqlens_q[-1] and requests of no tokens (seq_len 1, the
    scratch page); zero_out=True gives zero rows there (split merge included) and the real rows unchanged."""
    torch.manual_seed(D + H + 2)
    q_lens, seq = [1, 14, 6], [702, 34, 6]
    q, kc, vc, table, cu, sl, _ = make_batch(q_lens, seq, H, KVH, D, dtype, extra_pages=1)
    q = q / D ** 0.5
    T, B, Tp, Bp = q.shape[0], len(q_lens), 128, 8
    qp = torch.randn(Tp, H, D, device=DEV, dtype=dtype)
    qp[:T] = q
    cup = torch.cat([cu, torch.full((Bp - B,), T, dtype=cu.dtype, device=DEV)])
    slp = torch.cat([sl, torch.ones(Bp - B, dtype=sl.dtype, device=DEV)])
    scratch = kc.shape[0] - 1
    tp = torch.full((Bp, 4096 // kc.shape[1]), scratch, dtype=torch.int32, device=DEV)
    tp[:B, :table.shape[1]] = table
    for window in (None, 512):
        exp = ref.paged_attention(q, kc, vc, table, cu, sl, window, None, 1.0)
        torch.empty(1 << 28, dtype=torch.uint8, device=DEV).fill_(0xFF)      # poison the allocator's reuse
        out = attention.paged_attention(qp, kc, vc, tp, cup, slp, window, None, 1.0, zero_out=True)
        assert_close(out[:T], exp, dtype, f"real rows window={window}", rel=2e-2 if dtype == torch.bfloat16 else 5e-3)
        assert (out[T:] == 0).all(), f"padded rows not zero (window={window})"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D,H,KVH", [(256, 8, 4), (512, 8, 1)])
def test_prefill_varlen_chunked(dtype, D, H, KVH):
    torch.manual_seed(3)
    q_lens = [37, 130, 5, 64]
    seq = [37, 300, 5, 200]  # requests 1 and 3 have a cached prefix (chunked prefill)
    q, kc, vc, table, cu, sl, _ = make_batch(q_lens, seq, H, KVH, D, dtype)
    q = q / D ** 0.5
    for window in (None, 50):
        plan = check(q, kc, vc, table, cu, sl, window, None, dtype)
        assert plan.warps_m == 4


@pytest.mark.parametrize("dtype", HALF)
def test_prefill_image_blocks(dtype):
    torch.manual_seed(4)
    q_lens = [40, 90]
    seq = [40, 150]
    q, kc, vc, table, cu, sl, bids = make_batch(q_lens, seq, 8, 4, 256, dtype, block=True)
    q = q / 16
    for window in (None, 20):
        check(q, kc, vc, table, cu, sl, window, bids, dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("D", [256, 512])
def test_store_kv(dtype, D):
    T, KVH, P, S = 29, 3, 11, 16
    kc = torch.randn(P, S, KVH, D, device=DEV, dtype=dtype)
    vc = torch.randn(P, S, KVH, D, device=DEV, dtype=dtype)
    big = torch.randn(T, 2 * KVH + 1, D, device=DEV, dtype=dtype)
    k, v = big[:, :KVH], big[:, KVH:2 * KVH]  # strided views
    slots = torch.randperm(P * S, device=DEV)[:T]
    slots[::7] = -1
    ek, ev = kc.clone(), vc.clone()
    ref.store_kv(k, v, ek, ev, slots)
    attention.store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


@pytest.mark.parametrize("rows,tile", [(8, "16x2"), (8, "16x3"), (8, "b16x2"), (8, "b16x3"), (16, "16x2"),
                                       (16, "16x3"), (16, "b16x2"), (16, "b16x3")])
@pytest.mark.parametrize("D,H,KVH", [(256, 16, 8), (512, 8, 1), (256, 8, 2)])
def test_decode_pipelines(monkeypatch, rows, tile, D, H, KVH):
    """Each loader and stage count of both decode kernels (GEMMA4RT_DECODE8_TILE / GEMMA4RT_DECODE16_TILE;
    "b": bulk copies on an mbarrier): decode rows, speculative rows and a prompt chunk with an image block,
    with the plan's splits and unsplit."""
    monkeypatch.setenv(f"GEMMA4RT_DECODE{rows}_TILE", tile)
    torch.manual_seed(D + H + KVH + len(tile) + rows)
    d = torch.bfloat16
    q_lens = [1] * 9 + [4, 1, 37]
    seq = [int(x) for x in torch.randint(40, 1300, (11,))] + [300]
    seq = [max(s, n) for s, n in zip(seq, q_lens)]
    q, kc, vc, table, cu, sl, _ = make_batch(q_lens, seq, H, KVH, D, d)
    q = q / D ** 0.5
    T = q.shape[0]
    bids = torch.full((T,), -1, dtype=torch.int32, device=DEV)
    bids[T - 20:T - 8] = 3
    span = table.shape[1] * kc.shape[1]
    for window, blocks in [(None, None), (128, bids)]:
        exp = ref.paged_attention(q, kc, vc, table, cu, sl, window, blocks, 1.0)
        base = attention.plan_attention(T, len(q_lens), H, KVH, span, window, decode_rows=rows)
        assert base.rows == rows
        for plan in (base, attention.AttentionPlan(1, -(-span // 32) * 32, base.max_tiles, base.warps_m)):
            out = run_native(q, kc, vc, table, cu, sl, window, blocks, plan)
            assert_close(out, exp, d, f"rows={rows} tile={tile} plan={plan} window={window}", rel=2e-2)


@pytest.mark.parametrize("rows", [8, 16])
@pytest.mark.parametrize("D", [256, 512])
def test_decode_one_split_over_many_pages(rows, D):
    """One CTA over a key range of more pages than the 8-row kernel stages in shared memory (128): its loaders
    read the page table from global memory; with the plan's splits the same batch stages its pages."""
    torch.manual_seed(11 + D + rows)
    d = torch.bfloat16
    seq = [3001, 2500, 40]
    q, kc, vc, table, cu, sl, _ = make_batch([1] * 3, seq, 16, 2, D, d)
    q = q / D ** 0.5
    span = table.shape[1] * kc.shape[1]
    exp = ref.paged_attention(q, kc, vc, table, cu, sl, None, None, 1.0)
    base = attention.plan_attention(3, 3, 16, 2, span, None, decode_rows=rows)
    for plan in (base, attention.AttentionPlan(1, -(-span // 32) * 32, base.max_tiles, base.warps_m)):
        out = run_native(q, kc, vc, table, cu, sl, None, None, plan)
        assert_close(out, exp, d, f"plan={plan}", rel=2e-2)


@pytest.mark.parametrize("rows", [8, 16])
def test_opcheck(rows):
    d = torch.bfloat16
    q, kc, vc, table, cu, sl, _ = make_batch([1, 1], [40, 70], 8, 1, 256, d)
    plan = attention.plan_attention(2, 2, 8, 1, table.shape[1] * 16, None, decode_rows=rows)
    assert plan.rows == rows
    ws_o, ws_lse = attention.attention_workspace(plan, 2, 8, 256, DEV)
    torch.library.opcheck(torch.ops.gemma4rt.paged_attention.default,
                          (q, kc, vc, table, cu, sl, None, 0, 1.0, plan.num_splits, plan.split_size, plan.max_tiles,
                           plan.warps_m, torch.empty_like(q), ws_o, ws_lse))
    k = torch.randn(2, 1, 256, device=DEV, dtype=d)
    torch.library.opcheck(torch.ops.gemma4rt.store_kv.default,
                          (k, k.clone(), kc, vc, torch.tensor([3, 50], device=DEV)))


@pytest.mark.parametrize("rows", [8, 16])
def test_cuda_graph_replay(rows):
    d = torch.bfloat16
    torch.manual_seed(5)
    q, kc, vc, table, cu, sl, _ = make_batch([1] * 6, [900, 33, 400, 1500, 7, 64], 16, 2, 512, d, reserve=1)
    q /= 512 ** 0.5
    knew = torch.randn(6, 2, 512, device=DEV, dtype=d)
    vnew = torch.randn(6, 2, 512, device=DEV, dtype=d)
    slots = torch.zeros(6, dtype=torch.int64, device=DEV)
    plan = attention.plan_attention(6, 6, 16, 2, table.shape[1] * 16, None, decode_rows=rows)
    assert plan.num_splits > 1 and plan.rows == rows
    out = torch.empty_like(q)
    ws_o, ws_lse = attention.attention_workspace(plan, 6, 16, 512, DEV)

    def fn():
        attention.store_kv(knew, vnew, kc, vc, slots)
        return attention.paged_attention_planned(q, kc, vc, table, cu, sl, None, None, 1.0, plan, out, ws_o, ws_lse)

    def refill():
        q.copy_(torch.randn_like(q) / 512 ** 0.5)
        knew.copy_(torch.randn_like(knew))
        vnew.copy_(torch.randn_like(vnew))
        sl.copy_(sl + 1)  # one more token per request, stored into its new slot
        pos = (sl - 1).long()
        slots.copy_(table.gather(1, (pos // 16)[:, None])[:, 0].long() * 16 + pos % 16)
        out.fill_(float("nan"))

    res = graph_replay(fn, None, refill)
    exp = ref.paged_attention(q, kc, vc, table, cu, sl, None, None, 1.0)
    assert_close(res, exp, d, "graph attention", rel=2e-2)
    # the new keys really went into the cache through the captured store
    pos = (sl - 1).long()
    got = kc[table.gather(1, (pos // 16)[:, None])[:, 0].long(), pos % 16]
    assert torch.equal(got, knew)
