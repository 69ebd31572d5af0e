"""A request whose grammar is still compiling is deferred, not waited for: the batch goes on, the
free request's tokens are those it gets alone, and the constrained one still obeys its grammar."""
import re
import time

from gemma4rt.llm import LLM
from gemma4rt.protocol import GrammarSpec, SamplingParams
from gemma4rt.worker import constrained


def test_slow_grammar_defers_only_its_request(monkeypatch):
    llm = LLM()
    free = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    alone = llm.generate([[2, 10, 11, 12]], free)[0].token_ids

    orig_prepare = constrained.GrammarSlots._prepare
    monkeypatch.setattr(constrained.GrammarSlots, "_prepare",
                        lambda self, spec: (time.sleep(0.5), orig_prepare(self, spec))[1])
    polls = {"pending": 0}
    orig_poll = constrained.SeqGrammar.poll

    def poll(self, backend_of):
        r = orig_poll(self, backend_of)
        polls["pending"] += r is None
        return r
    monkeypatch.setattr(constrained.SeqGrammar, "poll", poll)
    digits = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3,
                            grammar=GrammarSpec(kind="regex", value="[0-9]{3}"))
    t0 = time.time()
    outs = llm.generate([[2, 10, 11, 12], [2, 40, 41]], [free, digits])
    assert outs[0].token_ids == alone
    assert re.fullmatch(r"[0-9]{3}", outs[1].text), outs[1].text
    assert polls["pending"] > 0 and time.time() - t0 >= 0.5
