"""Scheduler policy through the Engine with the checking NoopRunner (it simulates the KV slots and
asserts every query reads back its own tokens)."""
from gemma4rt.config import CacheConfig, ModelInfo, PoolSpec, SchedulerConfig
from gemma4rt.protocol import MultimodalItem, SampledTokens, StepResult
from gemma4rt.scheduler import Scheduler

from .conftest import make_engine, req, run_all


def _plans(engine):
    """Wrap the runner to record plans."""
    plans = []
    inner = engine.runner.execute

    def execute(plan):
        plans.append(plan)
        return inner(plan)
    engine.runner.execute = execute
    return plans


def test_budget_chunking_and_decode_first():
    e = make_engine(chunk=16, max_total_tokens=1024)
    plans = _plans(e)
    e.add_request(req("a", range(10, 15), max_new=6))
    early = list(e.step().outputs)                        # a prefilled (5 tokens)
    e.add_request(req("b", range(20, 60), max_new=3))     # 40-token prompt: 3 chunks
    early += e.step().outputs
    p = plans[-1]
    assert [s.rid for s in p.scheduled] == ["a", "b"]     # decode first
    assert p.scheduled[0].num_tokens == 1 and p.scheduled[0].sample
    b = p.scheduled[1]
    assert (b.start, b.num_tokens, b.sample) == (0, 15, False)   # budget 16 - 1 decode
    for q in plans:
        assert sum(s.num_tokens for s in q.scheduled) <= 16
    res = run_all(e)
    got_a = sum(len(o.new_token_ids) for o in early if o.rid == "a") + len(res["a"][0])
    assert got_a == 6 and res["a"][1] == "length"
    assert res["b"][1] == "length" and len(res["b"][0]) == 3
    chunks_b = [s for q in plans for s in q.scheduled if s.rid == "b" and not s.sample]
    assert len(chunks_b) >= 2


def test_whole_prompt_when_chunking_disabled():
    e = make_engine(chunk=0, max_total_tokens=1024)
    plans = _plans(e)
    e.add_request(req("a", range(5, 205), max_new=2))
    run_all(e)
    assert plans[0].scheduled[0].num_tokens == 200 and plans[0].scheduled[0].sample


def test_max_running_requests():
    e = make_engine(max_running=2, max_total_tokens=1024)
    plans = _plans(e)
    for i in range(5):
        e.add_request(req(f"r{i}", range(10 + i, 20 + i), max_new=3))
    res = run_all(e)
    assert all(len(q.scheduled) <= 2 for q in plans)
    assert all(res[f"r{i}"][1] == "length" for i in range(5))


def test_eos_stop_and_min_tokens():
    e = make_engine()
    nr = e.runner.next_token
    e.runner.next_token = lambda seq, sp, salt: 106 if len(seq) >= 8 else nr(seq, sp, salt)
    e.add_request(req("a", range(10, 15), max_new=10))
    e.add_request(req("b", range(10, 15), max_new=10, min_new_tokens=6))
    e.add_request(req("c", range(10, 15), max_new=10, ignore_eos=True))
    e.add_request(req("d", range(10, 15), max_new=10, stop_token_ids=[nr(list(range(10, 15)), None, 0)]
                      if False else [], ignore_eos=True))
    res = run_all(e)
    assert res["a"][1] == "stop" and res["a"][2].matched_stop == 106 and len(res["a"][0]) == 4
    assert res["b"][1] == "stop" and len(res["b"][0]) == 7
    assert res["c"][1] == "length" and len(res["c"][0]) == 10


def test_context_length_finishes_with_length_and_errors():
    e = make_engine(context_length=32)
    assert "longer than the model's context length" in e.add_request(req("x", range(40)))
    assert e.add_request(req("a", range(10, 30), max_new=100)) is None
    res = run_all(e)
    assert res["a"][1] == "length" and len(res["a"][0]) == 12
    assert e.add_request(req("a2", [])) is not None


def test_prefix_hit_refcounts_and_identical_output():
    e = make_engine(page_size=4, chunk=64, max_total_tokens=512, window=8)
    prompt = list(range(100, 130))
    e.add_request(req("a", prompt, max_new=5))
    ra = run_all(e)
    e.add_request(req("b", prompt, max_new=5))
    e.add_request(req("c", prompt, max_new=5))
    rb = run_all(e)
    assert ra["a"][0] == rb["b"][0] == rb["c"][0]
    assert ra["a"][2].num_cached_tokens == 0
    assert rb["b"][2].num_cached_tokens == 28 and rb["c"][2].num_cached_tokens == 28   # (30-1)//4 pages
    st = e.stats()
    assert st.prefix_hit_tokens == 56 and all(u == 0 for u in st.pool_usage.values())
    # pages shared by b and c while both run: refcount 2 on the full pool
    e.add_request(req("d", prompt, max_new=5))
    e.add_request(req("f", prompt, max_new=5))
    e.step()
    pool = e.scheduler.pools["full"]
    shared = e.scheduler.requests["d"].pages["full"][:7]
    assert shared == e.scheduler.requests["f"].pages["full"][:7]
    assert all(pool.ref[p] == 2 for p in shared)
    run_all(e)
    assert all(pool.ref[p] == 0 for p in shared)


def test_prefix_disabled():
    e = make_engine(disable_cache=True)
    e.add_request(req("a", range(100, 130), max_new=2))
    run_all(e)
    e.add_request(req("b", range(100, 130), max_new=2))
    assert run_all(e)["b"][2].num_cached_tokens == 0


def test_lru_eviction_of_cached_pages():
    # 16 full pages of 4 tokens: each 29-token request caches 7 pages; the oldest goes first
    e = make_engine(page_size=4, max_total_tokens=64, window=None)
    pool = e.scheduler.pools["full"]
    for i, base in enumerate((100, 200, 300)):
        e.add_request(req(f"r{i}", range(base, base + 29), max_new=1))
        run_all(e)
    assert pool.num_used() == 0
    assert len(pool.evictable) <= 16
    e.add_request(req("again2", range(300, 329), max_new=1))
    assert run_all(e)["again2"][2].num_cached_tokens == 28      # newest survived
    e.add_request(req("again0", range(100, 129), max_new=1))
    assert run_all(e)["again0"][2].num_cached_tokens == 0       # oldest was evicted


def test_sliding_pages_released_while_running():
    W, ps, chunk = 8, 4, 8
    e = make_engine(page_size=ps, window=W, chunk=chunk, max_total_tokens=1024)
    limit = -(-W // ps) + 1 + -(-chunk // ps)
    e.add_request(req("a", range(10, 60), max_new=40))
    peak = 0
    while e.has_work():
        e.step()
        r = e.scheduler.requests.get("a")
        if r:
            held = [p for p in r.pages["sliding"] if p >= 0]
            peak = max(peak, len(held))
            assert len(held) <= limit
            assert len(r.pages["full"]) >= r.num_computed // ps
    assert peak >= 3
    assert e.stats().pool_usage["sliding"] == 0


def test_sliding_prefix_hit_needs_window():
    # A sliding page that left the cache cuts the match back to where the window is cached.
    e = make_engine(page_size=4, window=8, chunk=64, max_total_tokens=512)
    prompt = list(range(100, 141))
    e.add_request(req("a", prompt, max_new=1))
    run_all(e)
    sl = e.scheduler.pools["sliding"]
    r_keys = sorted(sl.key_page.items(), key=lambda kv: kv[1])
    # forget the sliding copy of logical page 8 (tokens 32..35), inside the window of cut 40
    victim = e.scheduler.pools["sliding"].key_page.pop(list(sl.key_page)[8])
    del sl.page_key[victim]
    sl.evictable.pop(victim)
    sl.free.append(victim)
    e.add_request(req("b", prompt, max_new=1))
    res = run_all(e)
    assert res["b"][2].num_cached_tokens == 32       # cut back from 40 to 32
    assert len(r_keys) >= 9


def test_preemption_under_tiny_pool():
    # 24 pages of 4 tokens; 6 requests that each need ~10 pages at the end
    e = make_engine(page_size=4, max_total_tokens=96, chunk=32, window=8)
    plans = _plans(e)
    expect = {}
    for i in range(6):
        p = list(range(10 + i, 30 + i))
        e.add_request(req(f"r{i}", p, max_new=20))
    res = run_all(e)
    assert e.scheduler.num_preemptions > 0
    assert any(nr.num_output_tokens > 0 for q in plans for nr in q.new_requests)
    assert any(q.removed_rids for q in plans)
    ref = make_engine(page_size=4, max_total_tokens=4096, chunk=32, window=8)
    for i in range(6):
        ref.add_request(req(f"r{i}", range(10 + i, 30 + i), max_new=20))
    expect = run_all(ref)
    for i in range(6):
        assert res[f"r{i}"][1] == "length"
        assert res[f"r{i}"][0] == expect[f"r{i}"][0]
    assert all(u == 0 for u in e.stats().pool_usage.values())


def test_request_that_never_fits():
    e = make_engine(page_size=4, max_total_tokens=32)
    err = e.add_request(req("big", range(10, 50)))
    assert err and "KV cache" in err
    e.add_request(req("grow", range(10, 20), max_new=100))
    res = run_all(e)
    assert res["grow"][1] == "length" and len(res["grow"][0]) == 32 - 10 + 1   # the cache bounds its length


def test_abort_frees_pages():
    e = make_engine(max_total_tokens=1024)
    e.add_request(req("a", range(10, 50), max_new=100))
    e.add_request(req("w", range(10, 50), max_new=100))
    e.step()
    assert e.stats().pool_usage["full"] > 0
    assert e.abort("a") and e.abort("w")
    assert not e.abort("nope")
    outs = e.step().outputs
    assert {o.rid: o.finish_reason for o in outs} == {"a": "abort", "w": "abort"}
    assert all(u == 0 for u in e.stats().pool_usage.values())
    e.add_request(req("b", range(10, 50), max_new=2))
    plans = _plans(e)
    run_all(e)
    assert "a" in plans[0].removed_rids


def test_image_block_not_split():
    e = make_engine(chunk=16, max_total_tokens=1024)
    plans = _plans(e)
    prompt = list(range(10, 60))
    item = MultimodalItem(modality="image", offset=12, num_tokens=10, content_hash="img", bidirectional=True)
    r = req("a", prompt, max_new=2)
    r.mm_items = [item]
    e.add_request(r)
    run_all(e)
    bounds = [s.start + s.num_tokens for q in plans for s in q.scheduled if not s.sample]
    assert bounds and all(not (12 < b < 22) for b in bounds)
    assert bounds[0] == 12
    # a block that starts the chunk and is larger than the budget is taken whole
    e2 = make_engine(chunk=8, max_total_tokens=1024)
    plans2 = _plans(e2)
    r2 = req("b", prompt, max_new=1)
    r2.mm_items = [item]
    e2.add_request(r2)
    run_all(e2)
    spans = [(s.start, s.num_tokens) for q in plans2 for s in q.scheduled]
    assert (12, 10) in spans


def test_speculative_multi_token_results():
    mi = ModelInfo(name="m", model_path="", context_length=100, vocab_size=512, eos_token_ids=(1,),
                   bos_token_id=2, pad_token_id=0)
    s = Scheduler(SchedulerConfig(), CacheConfig(page_size=4), [PoolSpec("full", 64, 4)], mi)
    s.add_request(req("a", range(10, 15), max_new=6))
    p = s.schedule()
    s.process_result(StepResult(step_id=p.step_id, sampled=[SampledTokens(rid="a", token_ids=[7])]))
    s.requests["a"].draft_token_ids = [8, 9]
    p = s.schedule()
    assert p.scheduled[0].draft_token_ids == [8, 9] and p.scheduled[0].num_tokens == 1
    out = s.process_result(StepResult(step_id=p.step_id, sampled=[SampledTokens(rid="a", token_ids=[8, 9, 1])]))
    o = out.outputs[0]
    assert o.new_token_ids == [8, 9, 1] and o.finish_reason == "stop"


def test_scheduler_delay_factor_admits_prompts_together():
    """--scheduler-delay-factor (vLLM's semantics): while a request runs, a new prompt waits until the oldest
    waiting one has waited longer than factor x the last prompt step's latency; then all waiting prompts
    are admitted in one step. With nothing running, a prompt is admitted at once."""
    from gemma4rt.config import EngineConfig
    from gemma4rt.engine import Engine
    from gemma4rt.protocol import AddRequest, SamplingParams
    from gemma4rt.worker.noop_runner import NoopRunner

    def engine(factor):
        cfg = EngineConfig(runner="noop", context_length=1024,
                           cache=CacheConfig(page_size=4, max_total_tokens=1024),
                           scheduler=SchedulerConfig(chunked_prefill_size=64, delay_factor=factor))
        e = Engine(cfg, runner=NoopRunner(cfg, sliding_window=8, check=True))
        now = [0.0]
        e.scheduler._clock = lambda: now[0]
        return e, now

    def add(e, rid, t):
        e.add_request(AddRequest(rid=rid, prompt_token_ids=list(range(10, 18)), arrival_time=t,
                                 sampling=SamplingParams(max_new_tokens=20, temperature=0.0)))

    e, now = engine(1.0)
    plans = _plans(e)
    add(e, "a", 0.0)
    e.step()                                   # t=0: nothing running, a is admitted at once
    assert [s.rid for s in plans[-1].scheduled] == ["a"]
    now[0] = 1.0                               # the prompt step took 1.0
    add(e, "b", 1.0)
    e.step()
    assert [s.rid for s in plans[-1].scheduled] == ["a"]          # b has waited 0 <= 1.0 x 1.0
    now[0] = 1.5
    add(e, "c", 1.5)
    e.step()
    assert [s.rid for s in plans[-1].scheduled] == ["a"]          # b has waited 0.5
    now[0] = 2.5
    e.step()                                                       # b has waited 1.5 > 1.0
    assert [s.rid for s in plans[-1].scheduled] == ["a", "b", "c"]
    res = run_all(e)
    assert all(res[r][1] == "length" for r in "abc")

    e0, now0 = engine(0.0)                     # the default: admitted in the next step
    plans0 = _plans(e0)
    add(e0, "a", 0.0)
    e0.step()
    now0[0] = 1.0
    add(e0, "b", 1.0)
    e0.step()
    assert [s.rid for s in plans0[-1].scheduled] == ["a", "b"]
