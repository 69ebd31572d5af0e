"""The decode-GEMM tuner on the GPU (gemma4rt/ops/gemm_tune.py, GEMMA4RT_GEMM_TUNE=1): the gemv ops'
kernel argument against the environment switch, a tuned table on real weight shapes that ops.linear then
follows bit for bit (eagerly and inside a replayed CUDA graph), and a bf16 engine started with tuning on."""
import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_util import DEV, graph_replay, require_native  # noqa: E402

require_native()

from gemma4rt.ops import gemm_tune  # noqa: E402
from gemma4rt.ops.activation import gelu_tanh_and_mul  # noqa: E402

lin = importlib.import_module("gemma4rt.ops.linear")


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("glu", [False, True])
def test_kernel_argument_matches_the_switch(monkeypatch, M, glu):
    d = torch.bfloat16
    w = torch.randn(2 * 300, 512, device=DEV, dtype=d) / 512 ** 0.5
    x = torch.randn(M, 512, device=DEV, dtype=d)
    run = lin.gemv_gelu_mul if glu else lin.gemv
    for k, env in ((1, "0"), (2, "1")):
        monkeypatch.setenv("GEMMA4RT_GEMV_MMA", env)
        forced = run(x, w, 0)
        monkeypatch.delenv("GEMMA4RT_GEMV_MMA")
        assert torch.equal(run(x, w, k), forced), (k, M)
    op = torch.ops.gemma4rt.gemv_gelu_mul if glu else torch.ops.gemma4rt.gemv
    out = torch.empty(M, 300 if glu else 600, device=DEV, dtype=d)
    with pytest.raises(RuntimeError):
        op(x, w, out, 3)


def test_tuned_table_is_followed(monkeypatch):
    d = torch.bfloat16
    torch.manual_seed(0)
    weights = [(torch.randn(2560, 1536, device=DEV, dtype=d), False),       # E2B q|k|v
               (torch.randn(12288, 1536, device=DEV, dtype=d), True),       # E2B gate|up
               (torch.randn(5376, 21504, device=DEV, dtype=d), False)]      # 31B down
    table = gemm_tune.tune(weights, reps=3)
    assert set(table.values()) <= {lin.CUDA_CORES, lin.TENSOR_CORES, lin.CUBLAS}
    print("[gemm-tune]", {k: gemm_tune.NAMES[v] for k, v in sorted(table.items())})
    monkeypatch.setattr(lin, "CHOICE", dict(table))
    for w, glu in weights:
        for m in (1, 2, 4, 8):
            x = torch.randn(m, w.shape[1], device=DEV, dtype=d)
            k = table.get((w.shape[0], w.shape[1], glu, m), 0)
            if glu:
                want = gelu_tanh_and_mul(F.linear(x, w)) if k == lin.CUBLAS else lin.gemv_gelu_mul(x, w, k)
                assert torch.equal(lin.linear_gelu_mul(x, w), want)
            else:
                want = F.linear(x, w) if k == lin.CUBLAS else lin.gemv(x, w, k)
                assert torch.equal(lin.linear(x, w), want)
    # a forced choice of each kind inside a captured graph, replayed on new input
    w = weights[0][0]
    x = torch.randn(4, w.shape[1], device=DEV, dtype=d)
    for k in (lin.CUDA_CORES, lin.TENSOR_CORES, lin.CUBLAS):
        monkeypatch.setattr(lin, "CHOICE", {(w.shape[0], w.shape[1], False, 4): k})
        got = graph_replay(lambda: lin.linear(x, w), None, lambda: x.copy_(torch.randn_like(x)))
        assert torch.equal(got, lin.linear(x, w)), k


def test_engine_starts_with_tuning(monkeypatch, tmp_path):
    from gemma4rt import LLM
    from gemma4rt.config import EngineConfig
    from gemma4rt.protocol import SamplingParams
    from gemma4rt.tools.tiny_checkpoint import write_tiny_checkpoint
    monkeypatch.setenv("GEMMA4RT_GEMM_TUNE", "1")
    monkeypatch.setattr(lin, "CHOICE", {})
    path = str(write_tiny_checkpoint(tmp_path / "e", "e", seed=0, dtype=torch.bfloat16))
    llm = LLM(engine_config=EngineConfig(device="cuda", model_path=path, dtype="bfloat16"))
    out = llm.generate([[2, 5, 6, 7]], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 8
    assert all(v in (lin.CUDA_CORES, lin.TENSOR_CORES, lin.CUBLAS) for v in lin.CHOICE.values())
