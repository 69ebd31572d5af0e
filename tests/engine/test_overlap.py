"""Overlap scheduling (--enable-overlap-schedule): step k+1 is planned and launched before step k's tokens
reach the host (the next step reads them on the device). Its outputs must be those of the synchronous
engine: greedy and seeded sampling, log-probabilities, stop tokens, min_new_tokens, preemption, penalties
and grammars (held back one step), prompt logprobs, aborts, prefix-cache reuse."""
import re

import pytest
import torch

from gemma4rt import LLM
from gemma4rt.protocol import AddRequest, GrammarSpec, SamplingParams
from gemma4rt.worker.model_runner import ModelRunner

PROMPTS = [[2] + [(7 * i + 3 * j) % 90 + 5 for j in range(n)] for i, n in enumerate([5, 70, 12, 33, 90, 8, 3, 150])]


def _params(stop=None):
    return [SamplingParams(max_new_tokens=6 + 3 * i, temperature=0.0 if i % 2 else 0.8, seed=i, logprobs=True,
                           top_logprobs=2 if i == 3 else 0, ignore_eos=True, min_new_tokens=2 if i == 5 else 0,
                           stop_token_ids=[stop[i]] if stop and stop[i] is not None else [])
            for i in range(len(PROMPTS))]


def _run(path, overlap, params, prompts=PROMPTS, **kw):
    llm = LLM(path, device="cpu", seed=0, overlap_schedule=overlap, **kw)
    assert llm.engine.overlap == overlap
    return llm, llm.generate(prompts, params)


def _same(a, b):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason, (x.token_ids, y.token_ids)
        if x.logprobs is not None:
            torch.testing.assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), rtol=0, atol=1e-4)
        assert x.top_logprobs == y.top_logprobs or torch.allclose(
            torch.tensor([[v for _, v in t] for t in x.top_logprobs]),
            torch.tensor([[v for _, v in t] for t in y.top_logprobs]), atol=1e-4)


@pytest.mark.parametrize("family", ["e", "moe"])
def test_overlap_equals_synchronous(tiny_checkpoint, family, monkeypatch):
    path = tiny_checkpoint(family, text_only=family != "e")
    kw = dict(max_running_requests=4, chunked_prefill_size=40)
    _, first = _run(path, False, _params(), **kw)
    # stop ids met mid-generation (the third token of every other request)
    stop = [o.token_ids[2] if i % 2 == 0 and len(o.token_ids) > 3 else None for i, o in enumerate(first)]
    _, sync = _run(path, False, _params(stop), **kw)
    assert any(o.finish_reason == "stop" for o in sync)
    fills = []
    orig = ModelRunner._missing_tokens
    monkeypatch.setattr(ModelRunner, "_missing_tokens", lambda self: (lambda f: (fills.append(f is not None), f)[1])(orig(self)))
    _, over = _run(path, True, _params(stop), **kw)
    _same(sync, over)
    assert sum(fills) > 10, "decode steps did not read the previous step's tokens on the device"


def test_overlap_with_preemption_and_prefix_reuse(tiny_checkpoint):
    path = tiny_checkpoint("dense", text_only=True)
    sp = [SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)] * 6
    prompts = PROMPTS[:6]
    kw = dict(max_running_requests=6, chunked_prefill_size=64, max_total_tokens=300)
    llm_s, sync = _run(path, False, sp, prompts, **kw)
    llm_o, over = _run(path, True, sp, prompts, **kw)
    assert llm_o.engine.stats().num_preemptions > 0
    _same(sync, over)


def test_overlap_prefix_cache_reuse():
    """The demo model: a second run of the same prompts hits the prefix cache as often as in the
    synchronous engine and gives the same tokens. The 21-token prompt's first page leaves the sliding
    window in its first decode step, which overlap scheduling plans before the prompt step's result
    (and so its prefix-cache registration) is back: the page must stay until it is registered."""
    prompt = [2] + [(11 * j) % 300 + 10 for j in range(150)]
    sp = [SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True),
          SamplingParams(max_new_tokens=20, temperature=0.9, seed=4, ignore_eos=True)]
    runs, hits = [], []
    for overlap in (False, True):
        llm = LLM(chunked_prefill_size=32, page_size=16, overlap_schedule=overlap)
        first = llm.generate([prompt, prompt[:21]], sp)
        again = llm.generate([prompt, prompt[:120]], sp)
        short = llm.generate([prompt[:21]], sp[:1])
        runs.append(first + again + short)
        hits.append(llm.engine.scheduler.prefix_hit_tokens)
    _same(runs[0], runs[1])
    assert hits[0] >= 150 + 120 + 16 and hits[1] == hits[0], hits


def test_overlap_held_requests_penalties_grammar_prompt_logprobs(tiny_checkpoint):
    path = tiny_checkpoint("dense", text_only=True)
    sp = [SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                         frequency_penalty=0.5),
          SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, prompt_logprobs=True, logprobs=True),
          SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True),
          SamplingParams(max_new_tokens=8, temperature=0.7, seed=5, ignore_eos=True)]
    kw = dict(max_running_requests=4, chunked_prefill_size=32)
    _, sync = _run(path, False, sp, PROMPTS[:4], **kw)
    _, over = _run(path, True, sp, PROMPTS[:4], **kw)
    _same(sync, over)


def _steps_to_finish(llm, prompts, params):
    """Run to the end; per request the engine step at which it finished, its reason and the number of
    steps from its first token to its end, and its tokens."""
    eng = llm.engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        assert eng.add_request(AddRequest(rid=str(i), prompt_token_ids=p, sampling=sp)) is None
    done, toks, first, step = {}, {str(i): [] for i in range(len(prompts))}, {}, 0
    while eng.has_work():
        step += 1
        for o in eng.step().outputs:
            if o.new_token_ids:
                first.setdefault(o.rid, step)
            toks[o.rid] += o.new_token_ids
            if o.finish_reason:
                done[o.rid] = (step, o.finish_reason, step - first.get(o.rid, step))
    return done, toks


def test_overlap_grammar_on_demo_model():
    """A grammar-constrained request beside a free one: the same tokens as without overlap, and once its
    grammar is compiled it decodes at every step (not every other one); the step after its grammar
    ended it, already planned, samples nothing for it."""
    digits = SamplingParams(max_new_tokens=30, temperature=1.0, seed=3, grammar=GrammarSpec(kind="regex", value="[0-9]{16}"))
    short = SamplingParams(max_new_tokens=8, temperature=0.0, seed=3, grammar=GrammarSpec(kind="regex", value="[0-9]{3}"))
    free = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = [[2, 10, 11, 12], [2, 40, 41], [2, 7, 8]]
    sync = LLM(overlap_schedule=False).generate(prompts, [free, digits, short])
    over = LLM(overlap_schedule=True).generate(prompts, [free, digits, short])
    assert re.fullmatch(r"[0-9]{16}", over[1].text) and re.fullmatch(r"[0-9]{3}", over[2].text), over[1].text
    for a, b in zip(sync, over):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    s_done, _ = _steps_to_finish(LLM(overlap_schedule=False), prompts, [free, digits, short])
    o_done, o_toks = _steps_to_finish(LLM(overlap_schedule=True), prompts, [free, digits, short])
    assert o_toks["1"] == sync[1].token_ids
    # 17 tokens (16 digits and the end): from its first token, every other step would take ~32 steps; at
    # most a few more than without overlap (the step planned before the first token came back holds the
    # request). Counted from the first token: how long the grammar takes to compile (in a thread) varies
    # with the machine's load, and the steps before it are deferrals, not decoding
    assert o_done["1"][2] <= s_done["1"][2] + 3, (o_done, s_done)


def test_overlap_abort_mid_generation(tiny_checkpoint):
    path = tiny_checkpoint("dense", text_only=True)
    llm = LLM(path, device="cpu", seed=0, overlap_schedule=True, max_running_requests=4)
    eng = llm.engine
    sp = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    for i in range(3):
        assert eng.add_request(AddRequest(rid=f"a{i}", prompt_token_ids=PROMPTS[i], sampling=sp)) is None
    got = {f"a{i}": [] for i in range(3)}
    fin = {}
    steps = 0
    while eng.has_work():
        steps += 1
        if steps == 6:
            assert eng.abort("a1")
        for o in eng.step().outputs:
            got[o.rid].extend(o.new_token_ids)
            if o.finish_reason:
                fin[o.rid] = o.finish_reason
    assert fin == {"a0": "length", "a1": "abort", "a2": "length"}
    assert len(got["a0"]) == 30 and len(got["a2"]) == 30 and len(got["a1"]) < 30
    ref = LLM(path, device="cpu", seed=0, max_running_requests=4).generate([PROMPTS[0], PROMPTS[2]], sp)
    assert got["a0"] == ref[0].token_ids and got["a2"] == ref[1].token_ids
    assert not eng.scheduler.running and not eng.scheduler.inflight and eng._in_flight is None


def test_overlap_flags():
    from gemma4rt.cli import parse_args
    default, _, _ = parse_args([])
    on, _, _ = parse_args(["--enable-overlap-schedule"])
    both, _, _ = parse_args(["--enable-overlap-schedule", "--disable-overlap-schedule"])
    assert default.scheduler.overlap_schedule is None          # auto: on where the runner computes on a GPU
    assert on.scheduler.overlap_schedule and not on.scheduler.disable_overlap_schedule
    assert LLM(engine_config=on).engine.overlap and not LLM(engine_config=both).engine.overlap
    assert not LLM(engine_config=default).engine.overlap       # the demo model on the CPU: synchronous


def test_overlap_through_graph_buffers(tiny_checkpoint):
    """The CUDA-graph path's static buffers (StepGraphs(capture=False): the same copies and padding, run
    eagerly): decode and mixed steps read the previous step's tokens on the device there too."""
    from gemma4rt.worker.cuda_graph import DECODE, MIXED, StepGraphs
    path = tiny_checkpoint("e")
    outs, kinds = {}, {}
    for overlap in (False, True):
        llm = LLM(path, device="cpu", seed=0, overlap_schedule=overlap, max_running_requests=4, chunked_prefill_size=40)
        g = StepGraphs(llm.engine.runner, max_bs=4, max_tokens=100, capture=False)
        seen = []
        run = g.run
        g.run = lambda arr, kind=DECODE, fix=None: (seen.append((kind, fix is not None)), run(arr, kind, fix))[1]
        llm.engine.runner.graphs = g
        outs[overlap] = llm.generate(PROMPTS[:6], _params()[:6])
        kinds[overlap] = seen
    _same(outs[False], outs[True])
    assert any(k == DECODE and f for k, f in kinds[True]) and any(k == MIXED and f for k, f in kinds[True])
    assert not any(f for _, f in kinds[False])


@pytest.mark.parametrize("where", ["launch", "collect"])
def test_overlap_step_failure_fails_its_requests_and_the_engine_goes_on(monkeypatch, where):
    """A step that raises in the worker (at launch or when its tokens are collected) ends the requests in it
    with an error; requests added afterwards run to the end, with the synchronous engine's tokens."""
    llm = LLM(overlap_schedule=True)
    eng = llm.engine
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    for i in range(2):
        assert eng.add_request(AddRequest(rid=f"a{i}", prompt_token_ids=PROMPTS[i][:20], sampling=sp)) is None
    calls = {"n": 0}
    orig = getattr(ModelRunner, where)

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected worker failure")
        return orig(self, *a, **k)

    monkeypatch.setattr(ModelRunner, where, flaky)
    fin, steps = {}, 0
    while eng.has_work() and steps < 200:
        steps += 1
        for o in eng.step().outputs:
            if o.finish_reason:
                fin[o.rid] = (o.finish_reason, o.error)
    assert set(fin) == {"a0", "a1"} and all(r == "error" and "injected" in e for r, e in fin.values()), fin
    assert not eng.scheduler.running and eng._in_flight is None
    later = llm.generate([PROMPTS[2][:20]], [sp])[0]
    ref = LLM(overlap_schedule=False).generate([PROMPTS[2][:20]], [sp])[0]
    assert later.finish_reason == "length" and later.token_ids == ref.token_ids
