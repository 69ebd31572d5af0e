import pytest

from gemma4rt.config import CacheConfig, EngineConfig, SchedulerConfig
from gemma4rt.engine import Engine
from gemma4rt.protocol import AddRequest, SamplingParams
from gemma4rt.worker.noop_runner import NoopRunner


OVERLAP = [False]      # the engines make_engine builds schedule with overlap (set per test by the fixture below)


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "overlap"])
def overlap_mode(request):
    """Every scheduler test runs twice: synchronous, and with overlap scheduling (the NoopRunner's steps
    finish at launch; the scheduler still processes each result one plan late, as with a GPU)."""
    OVERLAP[0] = request.param
    yield request.param
    OVERLAP[0] = False


def make_engine(*, page_size=4, max_total_tokens=256, chunk=64, max_running=16, window=8,
                sliding_pages=None, disable_cache=False, context_length=1024):
    cfg = EngineConfig(runner="noop", context_length=context_length,
                       cache=CacheConfig(page_size=page_size, max_total_tokens=max_total_tokens,
                                         disable_radix_cache=disable_cache),
                       scheduler=SchedulerConfig(max_running_requests=max_running, chunked_prefill_size=chunk,
                                                 overlap_schedule=OVERLAP[0]))
    runner = NoopRunner(cfg, sliding_window=window, check=True, num_sliding_pages=sliding_pages)
    return Engine(cfg, runner=runner)


def req(rid, prompt, max_new=4, **kw):
    return AddRequest(rid=rid, prompt_token_ids=list(prompt),
                      sampling=SamplingParams(max_new_tokens=max_new, temperature=0.0, **kw))


def run_all(engine, max_steps=10000):
    """Step until idle; returns {rid: (tokens, finish_reason, last output)} and the plans seen."""
    res = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for o in engine.step().outputs:
            toks, _, _ = res.get(o.rid, ([], None, None))
            res[o.rid] = (toks + o.new_token_ids, o.finish_reason, o)
    assert not engine.has_work(), "engine did not finish"
    return res


@pytest.fixture
def engine_factory():
    return make_engine
