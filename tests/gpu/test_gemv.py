"""Native skinny GEMM (csrc/gemm/gemv.cu) vs an fp32 matmul: 1-8 rows, odd column counts, strided rows,
poisoned outputs, opcheck, CUDA-graph replay, and the ops.linear switch."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_util import require_native  # noqa: E402

require_native()

from gpu_util import DEV, graph_replay, poison  # noqa: E402
from gemma4rt.ops import linear as lin  # noqa: E402


def _ref(x, w):
    return (x.float() @ w.float().t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("N,K", [(1, 8), (37, 1536), (2048, 2560), (333, 264), (6, 12288)])
def test_gemv_matches_fp32_matmul(dtype, M, N, K):
    big = torch.randn(M, K + 16, device=DEV, dtype=dtype)
    x = big[:, 8:8 + K]                                        # row stride K + 16, 16-byte aligned
    w = torch.randn(N, K, device=DEV, dtype=dtype) / K ** 0.5
    out = poison(M, N, dtype=dtype)
    torch.ops.gemma4rt.gemv(x, w, out)
    ref = _ref(x, w)
    err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), err
    assert lin.gemv_ok(x, w)


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
    x = torch.randn(3, 256, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(100, 256, device=DEV, dtype=torch.bfloat16)
    monkeypatch.setattr(lin, "GEMV_ENABLED", True)
    assert torch.equal(lin.linear(x, w), lin.gemv(x, w))
    x9 = torch.randn(9, 256, device=DEV, dtype=torch.bfloat16)
    assert torch.equal(lin.linear(x9, w), F.linear(x9, w))          # more rows: torch's GEMM
    monkeypatch.setattr(lin, "GEMV_ENABLED", False)
    assert torch.equal(lin.linear(x, w), F.linear(x, w))
