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
