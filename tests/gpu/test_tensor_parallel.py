"""Tensor parallelism on two GPUs (NCCL all-reduces, CUDA graphs captured with them inside) against one
GPU, on tiny checkpoints (fp32) and real geometries with random weights (bf16, CUDA graphs). Reported as not run with fewer than two CUDA devices."""
import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("not run: needs 2 CUDA devices (the nvidia-h200-x2 kind)", allow_module_level=True)

from gemma4rt import LLM  # noqa: E402
from gemma4rt.protocol import SamplingParams  # noqa: E402

PROMPTS = [[2] + [(17 * i + 31 * j) % 200 + 5 for j in range(n)] for i, n in enumerate([7, 3, 60, 25, 90, 12])]


def _run(path, tp, dtype, **kw):
    """Generate PROMPTS; every request must finish without an error. The KV pools are sized from the free
    memory, so an earlier test's runner still in a reference cycle is collected first. In a full tests/gpu run
    (2 x H200, 22:58) the first test here got requests without a single token (so ended in an error), which
    showed only as logprobs None; it passed when this file ran alone. A leftover runner is the likely cause,
    not a confirmed one."""
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    sp = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=True, ignore_eos=True)
    llm = LLM(path, device="cuda", dtype=dtype, seed=0, tp_size=tp, **kw)
    try:
        graphs = llm.engine.runner.graphs is not None
        outs = llm.generate(PROMPTS, sp)
        errors = [o.error for o in outs if o.finish_reason == "error"]
        assert not errors, errors
        return outs, graphs
    finally:
        llm.close()
        del llm
        torch.cuda.empty_cache()


@pytest.mark.parametrize("family", ["dense", "moe", "e"])
def test_fp32_two_gpus_match_one(tiny_checkpoint, family):
    """fp32 (reference ops, eager): the sharded sums differ from the unsharded ones only in rounding."""
    path = tiny_checkpoint(family, text_only=family != "e")
    one, _ = _run(path, 1, "float32")
    two, _ = _run(path, 2, "float32")
    for a, b in zip(one, two):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-3)


@pytest.mark.parametrize("family", ["dense", "moe", "e"])
def test_tiny_bf16_two_gpus_match_fp32_as_one_does(tiny_checkpoint, family):
    """bf16 with the native kernels (the sharded MoE tiles and entry GEMVs, the sharded projections) on two
    GPUs against our fp32 path on one, beside bf16 on one GPU against the same fp32 run: sharding may change
    the rounding, not the size of the error. The first token's log-probability error of two GPUs stays within
    three times one GPU's plus 0.08 (the tiny MoE's bf16 tolerance in test_model_bf16), and the first tokens
    agree. Each sharded partial sum is rounded to bf16 before the all-reduce: on the tiny E model the reference
    ops on the CPU give 0.045 with one rank and 0.067 with two, as this test saw on two H200s (0.067 against
    0.015 on one)."""
    path = tiny_checkpoint(family, text_only=family != "e")
    ref, _ = _run(path, 1, "float32")
    one, _ = _run(path, 1, "bfloat16")
    two, _ = _run(path, 2, "bfloat16")

    def err(run):
        return max(abs(a.logprobs[0] - b.logprobs[0]) for a, b in zip(ref, run) if a.token_ids[0] == b.token_ids[0])

    e1, e2 = err(one), err(two)
    agree = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(ref, two))
    print(f"[tp-tiny-{family}] first-token logprob error vs fp32: 1 GPU {e1:.4f}, 2 GPUs {e2:.4f}; "
          f"first tokens agree {agree}/{len(PROMPTS)}")
    assert agree >= len(PROMPTS) - 1
    assert e2 <= 3 * e1 + 0.08, (e2, e1)


def _run_dummy(name, tp, chunk=256):
    """A real geometry with random weights (the tiny checkpoints' head dims get no CUDA graphs): decode and
    mixed-step CUDA graphs, small buffers."""
    from gemma4rt.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
    cfg = EngineConfig(model_path=name, load_format="dummy", device="cuda", dtype="bfloat16", seed=0,
                       context_length=512, cuda_graph_max_bs=8, cuda_graph_max_tokens=256,
                       cache=CacheConfig(max_total_tokens=8192),
                       scheduler=SchedulerConfig(max_running_requests=8, chunked_prefill_size=chunk),
                       parallel=ParallelConfig(tp=tp))
    return _run(None, tp, "bfloat16", engine_config=cfg)


@pytest.mark.parametrize("name", ["gemma-4-E2B-it", "gemma-4-26B-A4B-it"])
def test_bf16_two_gpus_with_cuda_graphs(name):
    """bf16 with the native kernels and CUDA graphs (decode and mixed steps, NCCL all-reduces inside) on
    both ranks, real geometry with the same random weights (dummy weights are drawn whole and sharded): the
    first generated token of every prompt agrees with one GPU, and the first token's log-probability differs
    by no more than bf16 rounding. For the MoE model that bound is measured in the same run: a random
    router's top-8 over 128 experts flips on near-ties in 30 layers, so a rounding change moves the output
    much more than on a dense model. One GPU with 32-token prefill chunks (the longer prompts' attention then
    reads their prefix from the cache: another valid summation order) sets the spread that two GPUs may
    reach. The decoded continuations mostly agree."""
    one, g1 = _run_dummy(name, 1)
    two, g2 = _run_dummy(name, 2)
    assert g1 and g2, "CUDA graphs were not captured"
    first = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(one, two))
    assert first >= len(PROMPTS) - 1, first
    diffs = [abs(a.logprobs[0] - b.logprobs[0]) for a, b in zip(one, two) if a.token_ids[0] == b.token_ids[0]]
    d_tp, bound = max(diffs), 0.05
    if "A4B" in name:
        alt, _ = _run_dummy(name, 1, chunk=32)
        d_alt = max((abs(a.logprobs[0] - b.logprobs[0]) for a, b in zip(one, alt) if a.token_ids[0] == b.token_ids[0]),
                    default=0.0)
        print(f"[tp-moe] first-token logprob: 2 GPUs vs 1 {d_tp:.3f} (each prompt: "
              f"{', '.join(f'{d:.3f}' for d in diffs)}), 32-token prefill chunks vs 256 on 1 GPU {d_alt:.3f}")
        bound = max(bound, 3 * d_alt)
    assert d_tp < bound, (d_tp, bound)
    same = sum(x == y for a, b in zip(one, two) for x, y in zip(a.token_ids, b.token_ids))
    total = sum(len(a.token_ids) for a in one)
    print(f"[tp-{name}] decoded tokens that agree with one GPU: {same}/{total}")
    assert same >= 0.8 * total      # (2 x H200, 23:01: 48 / 48 for both models)
