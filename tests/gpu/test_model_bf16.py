"""GPU correctness of the serving path: bf16 on the GPU (native ops) against our fp32 path on the
same weights. Reported as not run without a CUDA device."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("not run: no CUDA device", allow_module_level=True)

from gemma4rt.config import EngineConfig  # noqa: E402
from gemma4rt.worker.model_runner import ModelRunner  # noqa: E402


def _free():
    import gc
    gc.collect()
    torch.cuda.empty_cache()


def _compare(path_or_name, load_format="auto", n_tokens=64, seed=0):
    _free()
    kw = dict(model_path=path_or_name, load_format=load_format, seed=seed)
    ref = ModelRunner(EngineConfig(device="cuda", dtype="float32", **kw))
    g = torch.Generator().manual_seed(seed)
    ids = [2] + torch.randint(5, min(ref.config.text.vocab_size, 250000), (n_tokens - 1,), generator=g).tolist()
    ref_logits = ref.score(ids).float()
    ref_sd = {k: v for k, v in ref.model.state_dict().items()}
    del ref
    _free()                       # the runner's KV pools sit in reference cycles: collect them first
    fast = ModelRunner(EngineConfig(device="cuda", dtype="bfloat16", **kw))
    # same weights: copy the fp32 weights (rounded) into the bf16 model
    fsd = fast.model.state_dict()
    for k, v in ref_sd.items():
        fsd[k].copy_(v.to(fsd[k].dtype))
    del ref_sd
    logits = fast.score(ids).float()
    del fast
    _free()
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    err = (logits - ref_logits).abs().max().item()
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    print(f"[bf16-vs-fp32] {path_or_name}: top-1 agreement {top1:.3f}, max |Δlogit| {err:.3f}, rel {rel:.2e}")
    return top1, err, rel


@pytest.mark.parametrize("family", ["e", "dense", "moe", "unified"])
def test_tiny_bf16_matches_fp32(family, tiny_checkpoint):
    top1, err, rel = _compare(tiny_checkpoint(family))
    # routing flips make the tiny random MoE the most sensitive (the CPU reference bf16 path shows
    # 7e-2 on it too); the others stay near 1e-2
    assert top1 >= 0.9 and rel < (8e-2 if family == "moe" else 3e-2)


def test_real_geometry_e2b_bf16_matches_fp32():
    if os.environ.get("GEMMA4RT_SKIP_LARGE_GPU_TESTS") == "1":
        pytest.skip("not run: GEMMA4RT_SKIP_LARGE_GPU_TESTS=1")
    top1, err, rel = _compare("gemma-4-E2B-it", load_format="dummy", n_tokens=600)
    assert top1 >= 0.8 and rel < 5e-2


def test_decode_cuda_graphs_equal_eager_decode():
    """A real geometry (E2B, bf16, dummy weights): decode steps through the captured graphs give the
    logits of the eager path on the same (teacher-forced) tokens, batched requests of different
    lengths included. (Greedy tokens alone are a poor check with random weights: their logits are
    nearly flat, so bf16 near-ties flip.)"""
    if os.environ.get("GEMMA4RT_SKIP_LARGE_GPU_TESTS") == "1":
        pytest.skip("not run: GEMMA4RT_SKIP_LARGE_GPU_TESTS=1")
    from gemma4rt.config import CacheConfig, SchedulerConfig
    _free()
    g = torch.Generator().manual_seed(1)
    prompts = [[2] + torch.randint(1000, 100000, (n,), generator=g).tolist() for n in (700, 33, 5)]
    logits, tokens = {}, None
    for graphs in (False, True):          # eager first: its greedy tokens are forced on the graph run
        r = ModelRunner(EngineConfig(model_path="gemma-4-E2B-it", load_format="dummy", device="cuda",
                                     dtype="bfloat16", disable_cuda_graph=not graphs, cuda_graph_max_bs=8,
                                     cache=CacheConfig(max_total_tokens=1 << 15),
                                     scheduler=SchedulerConfig(max_running_requests=8)))
        assert (r.graphs is not None) == graphs
        logits[graphs], out = _forced_decode(r, prompts, 24, tokens)
        tokens = tokens or out
        del r
        _free()
    rels = [((a - b).norm() / b.norm()).item() for a, b in zip(logits[True], logits[False])]
    top1 = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(logits[True], logits[False]))
    total = sum(b.shape[0] for b in logits[False])
    print(f"[graphs-vs-eager] E2B bf16, 23 decode steps x 3 requests: max rel logit diff {max(rels):.2e}, "
          f"top-1 agreement {top1}/{total}")
    # the same kernels run in both paths; only the batch padding of the graph differs
    assert max(rels) < 2e-2 and top1 >= 0.9 * total


def _forced_decode(runner, prompts, n_steps, forced=None):
    """tests/model/_driver.greedy_generate, recording each decode step's [B, V] logits (on the CPU)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
    from _driver import greedy_generate
    seen = []
    orig = runner.sampler.sample
    runner.sampler.sample = lambda lg, st, *a, **k: (seen.append(lg.float().cpu().clone()), orig(lg, st, *a, **k))[1]
    try:
        out = greedy_generate(runner, prompts, n_steps, forced=forced)
    finally:
        runner.sampler.sample = orig
    return seen[1:], out


def test_ple_table_in_host_memory_gives_the_same_logits():
    """--ple-on-host (E2B geometry): the PLE table in pinned host memory, rows gathered on the host,
    gives the logits of the on-device table, eager prefill and graph decode alike."""
    if os.environ.get("GEMMA4RT_SKIP_LARGE_GPU_TESTS") == "1":
        pytest.skip("not run: GEMMA4RT_SKIP_LARGE_GPU_TESTS=1")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
    from _driver import greedy_generate
    from gemma4rt.config import CacheConfig, SchedulerConfig
    _free()
    res = {}
    ids = [2] + list(range(1000, 1100))
    for host in (False, True):
        r = ModelRunner(EngineConfig(model_path="gemma-4-E2B-it", load_format="dummy", device="cuda",
                                     dtype="bfloat16", ple_on_host=host, cuda_graph_max_bs=4,
                                     cache=CacheConfig(max_total_tokens=1 << 14),
                                     scheduler=SchedulerConfig(max_running_requests=4)))
        assert (r.ple_host_table is not None) == host
        res[host] = (r.score(ids).float().cpu(), greedy_generate(r, [ids], 8))
        del r
        _free()
    assert torch.equal(res[True][0], res[False][0])
    assert res[True][1] == res[False][1]


@pytest.mark.parametrize("model", ["gemma-4-E2B-it", "gemma-4-26B-A4B-it"])
def test_fused_projection_norms_give_the_same_logits(model, monkeypatch):
    """E2B and 26B-A4B geometries (bf16, dummy weights): decode with each projection's norms inside its skinny
    GEMM (GEMMA4RT_FUSED_GEMV_NORM; a MoE layer's o_proj with its block's three norms, GEMMA4RT_FUSED_GEMV_NORM3),
    the per-layer-input gate's product in its epilogue (GEMMA4RT_FUSED_PLE_GATE) and the q/k norms, RoPE and KV
    store in the q/k/v GEMV, by each head's last CTA (GEMMA4RT_FUSED_QKV_ROPE), gives the unfused path's logits
    bit for bit, through the CUDA graphs and with batched requests."""
    if os.environ.get("GEMMA4RT_SKIP_LARGE_GPU_TESTS") == "1":
        pytest.skip("not run: GEMMA4RT_SKIP_LARGE_GPU_TESTS=1")
    import importlib
    from gemma4rt.config import CacheConfig, SchedulerConfig
    lin = importlib.import_module("gemma4rt.ops.linear")
    g = torch.Generator().manual_seed(2)
    prompts = [[2] + torch.randint(1000, 100000, (n,), generator=g).tolist() for n in (300, 17, 4)]
    logits, tokens = {}, None
    for fused in (False, True):
        monkeypatch.setattr(lin, "FUSED_GEMV_NORM", fused)
        monkeypatch.setattr(lin, "FUSED_PLE_GATE", fused)
        monkeypatch.setattr(lin, "FUSED_QKV_ROPE", fused)
        monkeypatch.setattr(lin, "FUSED_GEMV_NORM3", fused)
        _free()
        r = ModelRunner(EngineConfig(model_path=model, load_format="dummy", device="cuda",
                                     dtype="bfloat16", cuda_graph_max_bs=8, cuda_graph_max_tokens=0,
                                     cache=CacheConfig(max_total_tokens=1 << 14),
                                     scheduler=SchedulerConfig(max_running_requests=8)))
        assert r.graphs is not None
        logits[fused], out = _forced_decode(r, prompts, 12, tokens)
        tokens = tokens or out
        del r
    _free()
    assert len(logits[True]) == len(logits[False]) > 0
    for a, b in zip(logits[True], logits[False]):
        assert torch.equal(a, b)


def test_llm_close_gives_the_device_memory_back():
    """LLM.close() on a GPU: the weights, KV pools (sized from the free memory) and CUDA graphs go back at once,
    without waiting for the garbage collector, so that a second LLM in the process finds the memory free."""
    from gemma4rt import LLM, SamplingParams
    _free()
    base = torch.cuda.memory_reserved()
    llm = LLM("gemma-4-E2B-it", load_format="dummy", device="cuda", dtype="bfloat16", context_length=2048,
              max_running_requests=8)
    out = llm.generate([[2, 17, 33, 40]], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    held = torch.cuda.memory_reserved()
    llm.close()
    freed = torch.cuda.memory_reserved()
    print(f"[llm-close] reserved GB: before {base / 1e9:.2f}, open {held / 1e9:.2f}, after close {freed / 1e9:.2f}")
    assert held - base > 5e9                       # the weights (~10 GB) and the KV pools
    assert freed - base < 0.05 * (held - base)
