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
