"""The server with --enable-overlap-schedule (demo model): concurrent requests give the tokens of the
synchronous offline engine (greedy and seeded sampling, with log-probabilities), a streamed chat with a
stop string ends on it, a client that goes away mid-stream is aborted, and the server keeps serving."""
import concurrent.futures as cf
import json

import pytest

from .conftest import Server

TEXT = "Write a short story about a lighthouse keeper and a storm."
PROMPTS = [[2] + [(31 * i + 7 * j) % 400 + 5 for j in range(n)] for i, n in enumerate([4, 70, 12, 33, 9, 50])]


ARGS = ("--max-running-requests", "4", "--chunked-prefill-size", "32")


@pytest.fixture(scope="module")
def overlap_server():
    pytest.importorskip("gemma4rt.worker.model_runner")
    s = Server(*ARGS, "--enable-overlap-schedule", timeout=300)
    yield s
    s.stop()


def _params(i):
    return {"max_new_tokens": 10 + 2 * i, "temperature": 0 if i % 2 else 0.8, "seed": i, "ignore_eos": True}


def _generate_all(server):
    def gen(i):
        st, body, _ = server.post("/generate", {"input_ids": PROMPTS[i], "sampling_params": _params(i),
                                                "return_logprob": True})
        assert st == 200, body
        return json.loads(body)
    with cf.ThreadPoolExecutor(6) as ex:
        return list(ex.map(gen, range(len(PROMPTS))))


def test_overlap_server_equals_synchronous_server(overlap_server):
    import torch
    outs = _generate_all(overlap_server)
    sync_server = Server(*ARGS, timeout=300)
    try:
        ref = _generate_all(sync_server)
    finally:
        sync_server.stop()
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in ref]
    lp = lambda o: [x[0] for x in o["meta_info"]["output_token_logprobs"]]  # noqa: E731
    for o, r in zip(outs, ref):
        torch.testing.assert_close(torch.tensor(lp(o)), torch.tensor(lp(r)), rtol=0, atol=1e-4)


def test_overlap_server_stream_stop_and_disconnect(overlap_server):
    from openai import OpenAI
    c = OpenAI(base_url=overlap_server.url + "/v1", api_key="x", max_retries=0)
    full = c.completions.create(model="default", prompt=TEXT, max_tokens=20, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    text, fin = "", None
    for ch in c.completions.create(model="default", prompt=TEXT, max_tokens=20, temperature=0, stream=True,
                                   stop=[stop], extra_body={"ignore_eos": True}):
        text += ch.choices[0].text
        fin = ch.choices[0].finish_reason or fin
    assert fin == "stop" and text == full[:full.index(stop)]
    stream = c.completions.create(model="default", prompt=PROMPTS[2], max_tokens=200, temperature=0.7,
                                  stream=True, extra_body={"ignore_eos": True})
    for k, _ in enumerate(stream):
        if k == 3:
            break
    stream.close()                                       # the client leaves: the request is aborted
    load = overlap_server.wait_idle()
    assert load.get("num_running", 0) == 0, load
    again = c.completions.create(model="default", prompt=TEXT, max_tokens=20, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text
    assert again == full
