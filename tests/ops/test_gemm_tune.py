"""The GEMM tuner's logic on the CPU (gemma4rt/ops/gemm_tune.py): the choice rule, which weights it times,
the table it builds from measured times, and how ops.linear / ops.linear_gelu_mul follow the table. The
timing itself and the kernels run in tests/gpu/test_gemm_tune.py."""
import importlib

import torch
import torch.nn.functional as F

from gemma4rt.ops import gemm_tune
from gemma4rt.ops import reference as ref

lin = importlib.import_module("gemma4rt.ops.linear")


def test_pick_keeps_the_default_unless_clearly_faster():
    assert gemm_tune.pick({0: 10.0, 1: 9.9, 2: 12.0, 3: 11.0}) == 0          # 1% is noise
    assert gemm_tune.pick({0: 10.0, 1: 9.0, 2: 12.0, 3: 8.0}) == 3
    assert gemm_tune.pick({0: 10.0, 1: 10.5, 2: 9.6, 3: 20.0}) == 2
    assert gemm_tune.pick({0: 5.0, 1: 5.0, 2: 5.0, 3: 5.0}) == 0


def test_decode_weights_of_a_tiny_model():
    from gemma4rt.model.text import MLP, Gemma4TextModel, Linear
    from gemma4rt.model_config import parse_model_config
    from gemma4rt.tools.tiny_checkpoint import config_dict
    model = Gemma4TextModel(parse_model_config(config_dict("e")).text)
    model.fuse_projections()
    ws = gemm_tune.decode_weights(model, None)
    ids = {id(w): glu for w, glu in ws}
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert mlps and all(ids.get(id(m.gate_up_proj.weight)) is True for m in mlps)
    assert all(ids.get(id(m.down_proj.weight)) is False for m in mlps)
    assert ids.get(id(model.embed_tokens.weight)) is False                 # the tied LM head
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(id(m.weight) in ids for m in linears)
    assert len(ids) == len(linears) + 1
    assert isinstance(model, Gemma4TextModel)


def test_tune_builds_the_table_from_the_timer(monkeypatch):
    monkeypatch.setattr(lin, "gemv_ok", lambda x, w: True)
    w1, w2 = torch.zeros(64, 32), torch.zeros(48, 32)                       # w2: a gate|up of 24 columns
    times = {(64, False): {0: 10.0, 1: 10.0, 2: 10.0, 3: 7.0},              # µs by kernel, any row count
             (48, True): {0: 10.0, 1: 9.8, 2: 9.0, 3: 12.0}}
    real = gemm_tune._candidates

    def tagged(x, w, glu):                     # the real candidate set, each callable tagged instead of run
        out = {}
        for k in real(x, w, glu):
            f = (lambda: None)
            f.tag = (w.shape[0], glu, k)
            out[k] = f
        return out

    calls = []

    def timer(fn, reps):
        calls.append(fn.tag)
        n, glu, k = fn.tag
        return times[(n, glu)][k]

    monkeypatch.setattr(gemm_tune, "_candidates", tagged)
    table = gemm_tune.tune([(w1, False), (w2, True), (w1, False)], timer=timer)
    assert table == {**{(64, 32, False, m): lin.CUBLAS for m in range(1, 9)},
                     **{(48, 32, True, m): lin.TENSOR_CORES for m in range(1, 9)}}
    assert len(calls) == 2 * 8 * 4                                           # the repeated shape once


def test_linear_follows_the_table(monkeypatch):
    torch.manual_seed(0)
    x, w, gu = torch.randn(3, 32), torch.randn(64, 32), torch.randn(48, 32)
    used = []
    monkeypatch.setattr(lin, "gemv_ok", lambda x, w: True)
    monkeypatch.setattr(lin, "gemv", lambda x, w, k=0: (used.append(("gemv", k)), F.linear(x, w))[1])
    monkeypatch.setattr(lin, "gemv_gelu_mul",
                        lambda x, w, k=0: (used.append(("glu", k)), ref.gelu_tanh_and_mul(F.linear(x, w)))[1])
    monkeypatch.setattr(lin, "CHOICE", {})
    lin.linear(x, w)
    lin.linear_gelu_mul(x, gu)
    assert used == [("gemv", 0), ("glu", 0)]                               # empty table: the defaults
    used.clear()
    monkeypatch.setattr(lin, "CHOICE", {(64, 32, False, 3): lin.CUDA_CORES, (48, 32, True, 3): lin.CUBLAS,
                                        (64, 32, False, 2): lin.CUBLAS})
    assert torch.allclose(lin.linear(x, w), F.linear(x, w))
    out = lin.linear_gelu_mul(x, gu)
    assert torch.allclose(out, ref.gelu_tanh_and_mul(F.linear(x, gu)), atol=1e-6)
    assert used == [("gemv", lin.CUDA_CORES)]                              # gate|up went to cuBLAS
    used.clear()
    lin.linear(x[:2], w)                                                   # 2 rows: cuBLAS
    lin.linear(x[:1], w)                                                   # 1 row: not in the table
    assert used == [("gemv", 0)]


def test_off_by_default(monkeypatch):
    monkeypatch.delenv("GEMMA4RT_GEMM_TUNE", raising=False)
    assert not gemm_tune.enabled()
    monkeypatch.setattr(lin, "CHOICE", {})
    gemm_tune.tune_models(torch.nn.Linear(4, 4))
    assert lin.CHOICE == {}
