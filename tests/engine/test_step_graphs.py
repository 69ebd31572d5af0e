"""The CUDA-graph step path's padding, checked on the CPU: StepGraphs(capture=False) fills the same
static buffers a captured graph reads (requests padded to a batch bucket at decode; tokens padded to a
token bucket, with requests past the real ones owning no rows, in mixed prefill + decode steps) and runs
them eagerly. Greedy tokens and log-probabilities must equal the unpadded eager path."""
import torch

from gemma4rt import LLM
from gemma4rt.protocol import SamplingParams
from gemma4rt.worker.cuda_graph import DECODE, MIXED, StepGraphs, token_buckets


def _generate(path, graphs: bool, family_kw):
    llm = LLM(path, device="cpu", seed=0, max_running_requests=6, chunked_prefill_size=40, **family_kw)
    r = llm.engine.runner
    kinds = []
    if graphs:
        g = StepGraphs(r, max_bs=6, max_tokens=100, capture=False)
        run = g.run

        def spy(arr, kind=DECODE):
            kinds.append(kind)
            return run(arr, kind)
        g.run = spy
        r.graphs = g
    prompts = [[2] + [(7 * i + 3 * j) % 90 + 5 for j in range(n)] for i, n in enumerate([5, 70, 12, 33, 90, 8])]
    sp = [SamplingParams(max_new_tokens=6 + i, temperature=0.0, logprobs=True, ignore_eos=True) for i in range(6)]
    return llm.generate(prompts, sp), kinds


def test_padded_static_steps_equal_eager(tiny_checkpoint):
    for family in ("e", "moe"):
        path = tiny_checkpoint(family, text_only=family != "e")
        plain, _ = _generate(path, False, {})
        padded, kinds = _generate(path, True, {})
        # prompts chunked at 40 tokens beside decoding requests: both kinds ran, and some steps were
        # too big for the graphs (eager)
        assert DECODE in kinds and MIXED in kinds, kinds
        for a, b in zip(plain, padded):
            assert a.token_ids == b.token_ids, family
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-4)


def test_token_buckets():
    assert token_buckets(100) == [100]
    b = token_buckets(5000)
    assert b[0] == 128 and b[-1] == 5000 and b == sorted(set(b))
    assert max(y - x for x, y in zip(b, b[1:])) <= 512
    assert all(y - x == 128 for x, y in zip(b, b[1:]) if y <= 1024)


def test_mixed_request_cap(tiny_checkpoint, monkeypatch):
    """Steps with more requests than the mixed graphs' request count (MIXED_MAX_BS) run eagerly; decode
    steps still use graphs up to --cuda-graph-max-bs."""
    from gemma4rt.worker import cuda_graph
    monkeypatch.setattr(cuda_graph, "MIXED_MAX_BS", 3)
    path = tiny_checkpoint("dense", text_only=True)
    llm = LLM(path, device="cpu", seed=0, max_running_requests=6, chunked_prefill_size=40)
    r = llm.engine.runner
    g = StepGraphs(r, max_bs=6, max_tokens=100, capture=False)
    assert g.mixed_bs == 3 and g.max_bs == 6
    seen = []
    run = g.run
    g.run = lambda arr, kind=DECODE: (seen.append((kind, int(arr.seq_lens.shape[0]))), run(arr, kind))[1]
    r.graphs = g
    prompts = [[2] + [(5 * i + j) % 90 + 5 for j in range(n)] for i, n in enumerate([5, 70, 12, 33, 60, 8])]
    out = llm.generate(prompts, [SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)] * 6)
    assert all(len(o.token_ids) == 8 for o in out)
    assert any(k == MIXED for k, _ in seen) and any(k == DECODE and n > 3 for k, n in seen), seen
    assert all(n <= 3 for k, n in seen if k == MIXED), seen
