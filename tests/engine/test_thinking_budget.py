"""vLLM's thinking_token_budget: once the thought channel holds that many tokens, its end token is forced
(greedy or sampled, with and without overlap scheduling); outside the channel nothing changes."""
import pytest

from gemma4rt import LLM
from gemma4rt.protocol import SamplingParams

PROMPT = [2, 10, 11, 12, 13]


def _run(overlap, **kw):
    sp = SamplingParams(max_new_tokens=10, temperature=kw.pop("temperature", 0.0), seed=7, ignore_eos=True, **kw)
    return LLM(overlap_schedule=overlap).generate([PROMPT], [sp])[0].token_ids


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_budget_forces_the_channel_end(overlap, temperature):
    free = _run(False, temperature=temperature)
    start, end = free[1], 7            # the second token opens the "channel"; 7 (its end) is not sampled freely
    assert end not in free[:6]
    got = _run(overlap, temperature=temperature, thinking_budget=2, thinking_tokens=[start, end])
    assert got[:4] == free[:4] and got[4] == end, (free, got)
    # a budget of 0 closes the channel right after it opens; a budget never reached changes nothing
    assert _run(overlap, temperature=temperature, thinking_budget=0, thinking_tokens=[start, end])[2] == end
    assert _run(overlap, temperature=temperature, thinking_budget=50, thinking_tokens=[start, end]) == free
    # no channel start among the outputs: nothing forced
    assert _run(overlap, temperature=temperature, thinking_budget=0, thinking_tokens=[5000, end]) == free
