"""Overlap scheduling on the GPU (E2B geometry, bf16, dummy weights, CUDA graphs): with every request
running to the same length the steps are those of the synchronous engine, so the tokens and
log-probabilities must be the same; the decode steps must read their input tokens on the device. Reported
as not run without a CUDA device or the extension."""
import gc
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_util import require_native, require_op  # noqa: E402

require_native()
require_op("paged_attention")

from gemma4rt import LLM  # noqa: E402
from gemma4rt.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from gemma4rt.protocol import SamplingParams  # noqa: E402
from gemma4rt.worker.model_runner import ModelRunner  # noqa: E402


def test_overlap_equals_synchronous_e2b(monkeypatch):
    if os.environ.get("GEMMA4RT_SKIP_LARGE_GPU_TESTS") == "1":
        pytest.skip("not run: GEMMA4RT_SKIP_LARGE_GPU_TESTS=1")
    g = torch.Generator().manual_seed(5)
    prompts = [[2] + torch.randint(1000, 100000, (n,), generator=g).tolist() for n in (600, 40, 7, 130, 300, 3)]
    sp = [SamplingParams(max_new_tokens=24, temperature=0.0 if i % 2 else 0.7, seed=i, logprobs=True,
                         ignore_eos=True) for i in range(len(prompts))]
    fills = []
    orig = ModelRunner._missing_tokens
    monkeypatch.setattr(ModelRunner, "_missing_tokens",
                        lambda self: (lambda f: (fills.append(f is not None), f)[1])(orig(self)))
    outs = {}
    for overlap in (False, True):
        gc.collect()
        torch.cuda.empty_cache()
        cfg = EngineConfig(model_path="gemma-4-E2B-it", load_format="dummy", device="cuda", dtype="bfloat16",
                           cuda_graph_max_bs=8, cache=CacheConfig(max_total_tokens=1 << 14),
                           scheduler=SchedulerConfig(max_running_requests=8, chunked_prefill_size=256,
                                                     overlap_schedule=overlap))
        llm = LLM(engine_config=cfg)
        assert llm.engine.overlap == overlap and llm.engine.runner.graphs is not None
        outs[overlap] = llm.generate(prompts, sp)
        del llm
    assert sum(fills) >= 20, "decode steps did not read their input tokens on the device"
    for a, b in zip(outs[False], outs[True]):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-3)
