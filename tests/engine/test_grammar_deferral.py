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
    # 1.5 s: longer than the free request's prefill even on a loaded 2-core machine (with 0.5 s, one run
    # beside another test suite found the grammar compiled before its first poll)
    monkeypatch.setattr(constrained.GrammarSlots, "_prepare",
                        lambda self, spec: (time.sleep(1.5), orig_prepare(self, spec))[1])
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


def test_constrained_requests_survive_preemption():
    """A KV pool too small for the batch preempts requests mid-generation; a constrained request
    resumed after recompute replays its tokens into a fresh matcher and still ends grammatical,
    with the tokens it would have produced without preemption (greedy)."""
    spec = GrammarSpec(kind="regex", value="(ab|cd|ef){12,16}")
    params = [SamplingParams(max_new_tokens=40, temperature=0.0, grammar=spec) for _ in range(6)]
    prompts = [[2] + [(7 * i + j) % 300 + 10 for j in range(40)] for i in range(6)]
    roomy = LLM(max_total_tokens=8192, page_size=16).generate(prompts, params)
    small = LLM(max_total_tokens=288, page_size=16)
    got = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    for a, b in zip(got, roomy):
        assert re.fullmatch("(ab|cd|ef){12,16}", a.text), a.text
        assert a.token_ids == b.token_ids


def test_grammar_end_outranks_min_tokens_and_ignore_eos():
    """A grammar that is complete ends the request (EOS), even with min_tokens or ignore_eos."""
    llm = LLM()
    spec = GrammarSpec(kind="regex", value="[0-9]{2}")
    for kw in ({"min_new_tokens": 10}, {"ignore_eos": True}):
        out = llm.generate([[2, 10, 11]], SamplingParams(max_new_tokens=20, temperature=1.0, seed=1, grammar=spec,
                                                          **kw))[0]
        assert out.finish_reason == "stop" and re.fullmatch("[0-9]{2}", out.text), (kw, out)


def test_deferral_after_chunked_prefill_and_prefix_hit(monkeypatch):
    """The deferred step is the last prompt position: with chunked prefill past the sliding window and
    a prefix-cache hit, the deferred requests generate exactly what they generate undelayed."""
    spec = GrammarSpec(kind="regex", value="[a-z ]{4,40}")
    prompt = [2] + [(11 * j) % 300 + 10 for j in range(150)]
    params = [SamplingParams(max_new_tokens=24, temperature=0.0, grammar=spec),
              SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)]

    def run():
        llm = LLM(chunked_prefill_size=32, page_size=16)
        first = llm.generate([prompt], params[:1])[0]
        again = llm.generate([prompt, prompt[:120]], params)            # prefix hits
        assert llm.engine.scheduler.prefix_hit_tokens > 0
        return [first.token_ids] + [o.token_ids for o in again]

    plain = run()
    orig = constrained.GrammarSlots._prepare
    monkeypatch.setattr(constrained.GrammarSlots, "_prepare", lambda self, s: (time.sleep(0.3), orig(self, s))[1])
    assert run() == plain
