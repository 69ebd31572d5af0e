"""Programmatic dependent launch (csrc/common/common.cuh): each native kernel may start while the one
before it drains and must wait before reading that kernel's output. A chain of dependent native ops
(norm -> skinny GEMM -> gelu-mul -> skinny GEMM -> fused norm -> attention ...), each reading what the
previous one wrote, is run back to back (eagerly and as a replayed CUDA graph) and compared bit for bit
with the same chain run one op at a time with a device synchronisation after each (no overlap at all).
A kernel that read its input early would see the previous replay's or stale values and differ."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_util import require_native, require_op  # noqa: E402

require_native()
require_op("paged_attention")

from gpu_util import DEV  # noqa: E402
from gemma4rt import ops  # noqa: E402
from gemma4rt.ops.attention import attention_workspace, paged_attention_planned, plan_attention  # noqa: E402


def _chain(x0, p, sync):
    def s(t):
        if sync:
            torch.cuda.synchronize()
        return t
    res = x0
    h = s(ops.rms_norm(x0, p["n0"], 1e-6))
    for i in range(4):
        qkv = s(ops.linear(h, p["wqkv"]))                                     # [B, 3 * 256]
        q = s(ops.head_norm_rope(qkv[:, :256].view(-1, 1, 256), p["qn"], 1e-6, p["cos"], p["sin"]))
        k = s(ops.head_norm_rope(qkv[:, 256:512].view(-1, 1, 256), p["kn"], 1e-6, p["cos"], p["sin"]))
        v = qkv[:, 512:].reshape(-1, 1, 256)
        s(ops.store_kv(k, v, p["kc"], p["vc"], p["slots"]))
        a = s(paged_attention_planned(q, p["kc"], p["vc"], p["ptab"], p["cu"], p["lens"], None, None, 1.0,
                                      p["plan"], p["out"], *p["ws"]))
        o = s(ops.linear(a.view(a.shape[0], -1), p["wo"]))                    # [B, H]
        h, res = ops.add_rms_norm(o, res, p["n1"], 1e-6)
        s(h)
        gu = s(ops.linear(h, p["wgu"]))                                       # [B, 2I]
        m = s(ops.gelu_tanh_and_mul(gu))
        d = s(ops.linear(m, p["wd"]))
        res, h = ops.norm_add_scale_norm(d, res, p["n2"], p["scale"], p["n0"], 1e-6)
        s(h)
    return h, res


def test_dependent_chain_matches_synchronised_run():
    torch.manual_seed(0)
    d = torch.bfloat16
    B, H, I, S = 2, 1536, 6144, 16                      # B decode rows, S cached keys per request
    r = lambda *sh, sc=1.0: (torch.randn(*sh, device=DEV) * sc).to(d)   # noqa: E731
    pages = 4
    kc = r(pages * B, 16, 1, 256)
    vc = r(pages * B, 16, 1, 256)
    lens = torch.full((B,), S + 1, dtype=torch.int32, device=DEV)
    ptab = torch.arange(pages * B, dtype=torch.int32, device=DEV).view(B, pages)
    slots = (ptab[:, 0].long() * 16 + S)                                # the new token's slot
    plan = plan_attention(B, B, 1, 1, pages * 16)
    cos = torch.randn(B, 128, device=DEV)
    sin = torch.randn(B, 128, device=DEV)
    p = dict(n0=r(H), n1=r(H), n2=r(H), qn=r(256), kn=r(256), wqkv=r(768, H, sc=H ** -0.5),
             wo=r(H, 256, sc=256 ** -0.5), wgu=r(2 * I, H, sc=H ** -0.5), wd=r(H, I, sc=I ** -0.5),
             scale=torch.tensor([0.7], device=DEV), cos=cos, sin=sin, kc=kc, vc=vc, slots=slots, ptab=ptab,
             cu=torch.arange(B + 1, dtype=torch.int32, device=DEV), lens=lens, plan=plan,
             out=torch.empty(B, 1, 256, dtype=d, device=DEV), ws=attention_workspace(plan, B, 1, 256, DEV))
    x0 = r(B, H)
    kc0, vc0 = kc.clone(), vc.clone()

    def reset():
        p["kc"].copy_(kc0)
        p["vc"].copy_(vc0)

    reset()
    want_h, want_res = (t.clone() for t in _chain(x0, p, sync=True))
    reset()
    torch.cuda.synchronize()
    got_h, got_res = _chain(x0, p, sync=False)
    torch.cuda.synchronize()
    assert torch.equal(got_h, want_h) and torch.equal(got_res, want_res)

    # graph replay: capture, then replay with a new input; compare with a synchronised run on it
    xs = x0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        reset()
        _chain(xs, p, sync=False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    reset()
    with torch.cuda.graph(g):
        gh, gres = _chain(xs, p, sync=False)
    x1 = r(B, H)
    reset()
    want1_h, want1_res = (t.clone() for t in _chain(x1, p, sync=True))
    for _ in range(3):
        reset()
        xs.copy_(x1)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(gh, want1_h) and torch.equal(gres, want1_res)
    assert not torch.equal(want1_h, want_h)                 # the new input did change the result
