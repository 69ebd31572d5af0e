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

        def spy(arr, kind=DECODE, *a):
            kinds.append(kind)
            return run(arr, kind, *a)
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



def test_capture_inputs_valid_for_every_graph(tiny_checkpoint):
    """The static inputs each graph is warmed up and captured with describe a valid step, also when a mixed
    graph has more requests than tokens (max_bs 130, a 128-token bucket): offsets within the tokens, no
    request with more tokens than its length, logit rows inside the step; and the forward runs on them."""
    path = tiny_checkpoint("dense", text_only=True)
    llm = LLM(path, device="cpu", seed=0, max_running_requests=130, chunked_prefill_size=200)
    g = StepGraphs(llm.engine.runner, max_bs=130, max_tokens=200, capture=False)
    assert (MIXED, 128, g.ctx_buckets[0]) in g.keys()
    model = llm.engine.runner.model
    for key in g.keys():
        g._capture_inputs(*key[:2])
        ctx = g._ctx(*key)
        cu, lens, T = ctx.cu_seqlens_q, ctx.seq_lens, ctx.input_ids.shape[0]
        assert int(cu[0]) == 0 and bool((cu[1:] >= cu[:-1]).all()) and int(cu[-1]) <= T, key
        assert bool(((cu[1:] - cu[:-1]) <= lens).all()), key
        assert int(ctx.logits_indices.max()) < T, key
        assert bool((torch.cat(list(ctx.slot_mappings.values())) == -1).all()), key
        if key[0] == MIXED or key[1] in (1, 130):
            out = model.compute_logits(model(ctx))
            assert out.shape[0] == ctx.logits_indices.shape[0] and bool(torch.isfinite(out).all()), key
