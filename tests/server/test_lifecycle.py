"""Servers with special settings: a tiny KV cache (preemption) with an API key and a short queue;
SIGTERM; a killed engine process."""
import json
import os
import signal
import threading
import time

import pytest

from .conftest import Server, alive, children


@pytest.fixture(scope="module")
def tiny():
    s = Server("--runner", "noop", "--context-length", "4096", "--max-total-tokens", "256", "--page-size", "16",
               "--chunked-prefill-size", "64", "--max-running-requests", "8", "--max-queued-requests", "4",
               api_key="sekret")
    yield s
    s.stop()


def test_api_key(tiny):
    from openai import AuthenticationError, OpenAI
    bad = OpenAI(base_url=tiny.url + "/v1", api_key="wrong", _strict_response_validation=True, max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.models.list()
    st, raw, _ = tiny.request("GET", "/v1/models", headers={"Authorization": "Bearer nope"})
    assert st == 401 and "error" in json.loads(raw)
    import urllib.request
    with urllib.request.urlopen(tiny.url + "/health") as r:          # no key needed
        assert r.status == 200
    good = OpenAI(base_url=tiny.url + "/v1", api_key="sekret", _strict_response_validation=True, max_retries=0)
    assert good.models.list().data[0].id


def test_workload_larger_than_kv_completes_by_preemption(tiny):
    import asyncio

    from openai import AsyncOpenAI, OpenAI
    N = 200                                       # 31 + 200 tokens = 15 of the 16 pages per request

    async def main():
        c = AsyncOpenAI(base_url=tiny.url + "/v1", api_key="sekret", _strict_response_validation=True,
                        max_retries=0)
        res = await asyncio.gather(*[
            c.completions.create(model="default", prompt=[2] + [10 + i] * 30, max_tokens=N, temperature=0,
                                 extra_body={"ignore_eos": True}) for i in range(6)])
        await c.close()
        return res
    res = asyncio.run(main())
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == N for r in res)
    d = tiny.wait_idle()
    assert d["num_preemptions"] > 0
    # the same prompt alone (no preemption) gives the same greedy text
    c = OpenAI(base_url=tiny.url + "/v1", api_key="sekret", _strict_response_validation=True, max_retries=0)
    alone = c.completions.create(model="default", prompt=[2] + [10] * 30, max_tokens=N, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert alone.choices[0].text == res[0].choices[0].text


def test_request_that_can_never_fit_is_400(tiny):
    st, raw, _ = tiny.post("/v1/completions", {"prompt": [5] * 400, "max_tokens": 1})
    assert st == 400 and "KV cache" in json.loads(raw)["error"]["message"]


def test_queue_full_429(tiny):
    """More sequences than --max-running-requests + --max-queued-requests (8 + 4) at once are a 429 with
    Retry-After: deterministically one request of 13 choices; then 40 concurrent requests (whether the queue
    fills depends on how fast this machine starts them: a loaded one ran them one after the other) get only
    200s and 429s, and the server serves afterwards."""
    st, raw, hdr = tiny.post("/v1/completions", {"prompt": "x", "max_tokens": 4, "n": 13})
    assert st == 429 and hdr.get("Retry-After") and json.loads(raw)["error"]["message"]
    assert tiny.post("/v1/completions", {"prompt": "x", "max_tokens": 4, "n": 12})[0] == 200
    results = []

    def run():
        results.append(tiny.post("/v1/completions", {"prompt": "x", "max_tokens": 3000, "ignore_eos": True},
                                 timeout=120))
    ts = [threading.Thread(target=run) for _ in range(40)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(2)
    tiny.post("/abort_request", {"abort_all": True})
    for t in ts:
        t.join(60)
    codes = [r[0] for r in results]
    assert len(codes) == 40 and set(codes) <= {200, 429}, codes
    for r in results:
        if r[0] == 429:
            assert r[2].get("Retry-After") and json.loads(r[1])["error"]["message"]
    tiny.wait_idle()
    assert tiny.post("/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def test_sigterm_leaves_no_orphan():
    s = Server("--runner", "noop")
    eng = s.engine_pid
    assert eng and alive(eng)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(20) == 0
    t_end = time.time() + 5
    while alive(eng) and time.time() < t_end:
        time.sleep(0.05)
    assert not alive(eng)
    s.stop()


def test_engine_death_fails_requests_and_health():
    s = Server("--runner", "noop", "--context-length", "65536", "--max-total-tokens", "131072")
    eng = s.engine_pid
    out = {}

    def run():
        out["r"] = s.post("/v1/completions", {"prompt": "x", "max_tokens": 60000, "ignore_eos": True}, timeout=60)
    t = threading.Thread(target=run)
    t.start()
    t_end = time.time() + 5
    while s.load().get("num_running", 0) == 0 and time.time() < t_end:
        time.sleep(0.02)
    os.kill(eng, signal.SIGKILL)
    t.join(20)
    st, raw, _ = out["r"]
    assert st >= 500 and "engine" in json.loads(raw)["error"]["message"].lower()
    try:
        assert s.get("/health")[0] == 503
    except OSError:
        pass                                   # already gone: also acceptable
    assert s.proc.wait(20) != 0                # the server shut itself down
    assert not children(s.proc.pid)
    s.stop()
