"""Mixed prefill + decode CUDA graphs (`--cuda-graph-max-tokens`) on the GPU: bf16, native kernels, the
captured graphs against the eager path on the same tiny checkpoint. Reported as not run without a CUDA
device or the extension."""
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
from gemma4rt.worker.cuda_graph import MIXED  # noqa: E402


def _generate(path, max_tokens):
    cfg = EngineConfig(model_path=path, device="cuda", dtype="bfloat16", seed=0, cuda_graph_max_bs=8,
                       cuda_graph_max_tokens=max_tokens, cache=CacheConfig(page_size=16),
                       scheduler=SchedulerConfig(max_running_requests=8, chunked_prefill_size=64))
    llm = LLM(engine_config=cfg)
    g = llm.engine.runner.graphs
    assert g is not None, "no CUDA graphs captured"
    kinds = []
    run = g.run

    def spy(arr, kind="decode"):
        kinds.append(kind)
        return run(arr, kind)
    g.run = spy
    prompts = [[2] + [(7 * i + 3 * j) % 200 + 5 for j in range(n)] for i, n in enumerate([5, 150, 12, 70, 200, 9, 33, 1])]
    sp = [SamplingParams(max_new_tokens=10 + 3 * i, temperature=0.0, logprobs=True, ignore_eos=True) for i in range(8)]
    out = llm.generate(prompts, sp)
    del llm
    torch.cuda.empty_cache()
    return out, kinds


@pytest.mark.parametrize("family", ["e", "moe", "dense"])
def test_mixed_graphs_match_eager_steps(tiny_checkpoint, family):
    path = tiny_checkpoint(family, text_only=family != "e")
    eager, k0 = _generate(path, 0)
    graphed, k1 = _generate(path, 256)
    assert MIXED not in k0 and MIXED in k1, (k0, k1)
    first = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(eager, graphed))
    assert first >= len(eager) - 1, first
    for a, b in zip(eager, graphed):
        if a.token_ids[0] == b.token_ids[0]:
            assert abs(a.logprobs[0] - b.logprobs[0]) < 0.05, (a.logprobs[0], b.logprobs[0])
    same = sum(x == y for a, b in zip(eager, graphed) for x, y in zip(a.token_ids, b.token_ids))
    assert same >= 0.8 * sum(len(a.token_ids) for a in eager)
