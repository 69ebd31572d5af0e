"""Sampler.sample_limit: a stand-in tokenizer smaller than the model's vocabulary bounds the sampled ids."""
import torch

from gemma4rt.protocol import SamplingParams
from gemma4rt.worker.sampler import Sampler, SeqSamplingState


def _states(n, **kw):
    return [SeqSamplingState(params=SamplingParams(max_new_tokens=4, **kw), seed=100 + i, prompt_ids=[]) for i in range(n)]


def test_limit_bounds_greedy_and_random_ids():
    V, limit = 64, 16
    logits = torch.zeros(6, V)
    logits[:, 40] = 10.0                     # the best id lies beyond the limit
    logits[:, 5] = 3.0
    free = Sampler(V, (1,)).sample(logits.clone(), _states(6, temperature=0.0))
    assert [r.token_ids[0] for r in free] == [40] * 6
    limited = Sampler(V, (1,), sample_limit=limit)
    assert [r.token_ids[0] for r in limited.sample(logits.clone(), _states(6, temperature=0.0))] == [5] * 6
    flat = torch.zeros(6, V)
    got = [r.token_ids[0] for r in limited.sample(flat, _states(6, temperature=1.0))]
    assert all(0 <= t < limit for t in got)


def test_limit_at_or_above_vocab_is_no_limit():
    assert Sampler(64, (1,), sample_limit=64).sample_limit is None
    assert Sampler(64, (1,), sample_limit=None).sample_limit is None


def test_never_ids_are_not_sampled():
    V = 32
    logits = torch.zeros(4, V)
    logits[:, 3] = 9.0
    logits[:, 7] = 5.0
    s = Sampler(V, (1,), never_ids=(3, 99))
    assert [r.token_ids[0] for r in s.sample(logits.clone(), _states(4, temperature=0.0))] == [7] * 4
    flat = torch.zeros(4, V)
    flat[:, 3] = 50.0
    assert all(r.token_ids[0] != 3 for r in s.sample(flat, _states(4, temperature=1.0)))


def test_sampling_never_changes_the_callers_logits():
    # the runner hands the step's logits over without a copy when every row samples; whatever the
    # sampler edits (blocked ids, bias, min_new_tokens, penalties) must go to its own copy
    V = 32
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    logits[:, 3] = 20.0
    before = logits.clone()
    blocking = [dict(logit_bias={3: -100.0}), dict(min_new_tokens=2), dict(suppress_token_ids=[3])]
    other = [dict(repetition_penalty=4.0, frequency_penalty=8.0), dict(logprobs=True, top_logprobs=2)]
    for s in (Sampler(V, (3,)), Sampler(V, (1,), sample_limit=16, never_ids=(3,))):
        for extra in blocking + other:
            states = _states(5, temperature=0.0, **extra)
            for st in states:
                st.prompt_ids = [3, 4]
                st.output_counts = {3: 2}
            got = [r.token_ids[0] for r in s.sample(logits, states)]
            assert torch.equal(logits, before), extra
            if extra in blocking or s.sample_limit is not None or "frequency_penalty" in extra:
                assert all(t != 3 for t in got), extra   # the edit did apply, to the copy
    plain = [r.token_ids[0] for r in Sampler(V, (1,)).sample(logits, _states(5, temperature=0.0))]
    assert plain == [3] * 5 and torch.equal(logits, before)


def test_bias_and_blocked_ids_per_row_in_one_batch():
    """Rows with different logit biases, suppressed ids and min_new_tokens-blocked EOS (applied as one
    scatter per kind): each row gets exactly its own edits."""
    V = 40
    logits = torch.zeros(5, V)
    logits[:, 9] = 5.0                               # every row's favourite unless edited
    logits[:, 1] = 4.0                               # EOS (id 1), second best
    states = [SeqSamplingState(params=p, seed=i, prompt_ids=[]) for i, p in enumerate([
        SamplingParams(max_new_tokens=4, temperature=0.0),
        SamplingParams(max_new_tokens=4, temperature=0.0, suppress_token_ids=[9]),                # -> EOS
        SamplingParams(max_new_tokens=4, temperature=0.0, suppress_token_ids=[9], min_new_tokens=3),
        SamplingParams(max_new_tokens=4, temperature=0.0, logit_bias={"20": 7.0, "9": -1.0}),
        SamplingParams(max_new_tokens=4, temperature=0.0, logit_bias={"9": -3.0}, suppress_token_ids=[30]),
    ])]
    logits[2, 12] = 3.0                              # row 2: EOS and 9 blocked -> 12
    got = [r.token_ids[0] for r in Sampler(V, (1,)).sample(logits, states)]
    assert got == [9, 1, 12, 20, 1]
