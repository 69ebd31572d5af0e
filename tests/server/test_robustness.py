"""Bad inputs, concurrency and client disconnects against the shared NoopRunner server."""
import asyncio
import json
import re
import socket
import time

import pytest


def _ok_after(server):
    st, body, _ = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 2})
    assert st == 200 and json.loads(body)["usage"]["completion_tokens"] == 2


def _err(body: bytes) -> dict:
    e = json.loads(body)["error"]
    assert set(e) >= {"message", "type", "param", "code"}
    return e


CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,param", [
    ({"messages": MSGS, "temperature": "hot"}, "temperature"),
    ({"messages": MSGS, "temperature": 5}, "temperature"),
    ({"messages": MSGS, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSGS, "n": 0}, "n"),
    ({"messages": MSGS, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": MSGS, "stop": 5}, "stop"),
    ({"messages": MSGS, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": MSGS, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "foo", "foo": 1}]}]}, "messages"),
    ({"messages": MSGS, "seed": 1 << 63}, "seed"),                 # beyond 64-bit ints: no worker overflow
    ({"messages": MSGS, "seed": 1 << 70}, "seed"),
    ({"messages": MSGS, "top_k": 1 << 64}, "top_k"),
    ({"messages": MSGS, "temperature": float("nan")}, "temperature"),
    ({"messages": MSGS, "presence_penalty": float("inf")}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
      }, "messages"),
])
def test_invalid_fields_are_400(server, body, param):
    st, raw, _ = server.post(CHAT, body)
    assert st == 400, raw
    assert _err(raw)["param"] == param
    _ok_after(server)


def test_input_text_parts_are_text(server):
    st, raw, _ = server.post(CHAT, {"messages": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                                    "max_tokens": 2})
    assert st == 200, raw
    st2, raw2, _ = server.post(CHAT, {"messages": MSGS, "max_tokens": 2})
    assert json.loads(raw)["usage"]["prompt_tokens"] == json.loads(raw2)["usage"]["prompt_tokens"]


def test_large_but_valid_numbers(server):
    """A top_k beyond the vocabulary is no cut; the largest 64-bit seed with n = 2 wraps for the second
    choice instead of overflowing in the worker."""
    for body in ({"top_k": 1 << 40}, {"seed": (1 << 63) - 1, "n": 2, "temperature": 1.0}, {"seed": -(1 << 63)}):
        st, raw, _ = server.post(CHAT, dict(body, messages=MSGS, max_tokens=3))
        assert st == 200, (body, raw)
    _ok_after(server)


def test_reasoning_fields_are_present_when_empty(server):
    """With --reasoning-parser, message.reasoning_content (and its alias reasoning) is there in every whole
    response, null when the answer holds no thought (clients read it as an attribute)."""
    for i in range(4):
        st, raw, _ = server.post(CHAT, {"messages": MSGS, "max_tokens": 4, "seed": i, "temperature": 1.0})
        msg = json.loads(raw)["choices"][0]["message"]
        assert st == 200 and "reasoning_content" in msg and "reasoning" in msg
        assert msg["reasoning_content"] == msg["reasoning"] and msg["reasoning_content"] != ""


def test_running_request_id_is_not_reused(server):
    """A client-chosen rid that a running request holds is a 400; the running request is not disturbed."""
    import threading
    res = {}

    def run():
        res["r"] = server.post(CHAT, {"messages": MSGS, "rid": "dup-1", "max_tokens": 60000, "ignore_eos": True})
    t = threading.Thread(target=run)
    t.start()
    t_end = time.time() + 5
    while server.load().get("num_running", 0) == 0 and time.time() < t_end:
        time.sleep(0.02)
    st, raw, _ = server.post(CHAT, {"messages": MSGS, "rid": "dup-1", "max_tokens": 2})
    assert st == 400 and _err(raw)["param"] == "rid"
    st, raw, _ = server.post("/generate", {"text": "x", "rid": "dup-1", "sampling_params": {"max_new_tokens": 2}})
    assert st == 400 and _err(raw)["param"] == "rid"
    assert server.post("/abort_request", {"rid": "dup-1"})[0] == 200
    t.join(10)
    st, raw, _ = res["r"]
    assert st == 200 and json.loads(raw)["choices"][0]["finish_reason"] == "abort"
    server.wait_idle(timeout=2)
    st, raw, _ = server.post(CHAT, {"messages": MSGS, "rid": "dup-1", "max_tokens": 2})   # free again
    assert st == 200


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": MSGS, "lora_path": "a"}, "lora_path"),
    (CHAT, {"messages": MSGS, "return_hidden_states": True}, "return_hidden_states"),
    (CHAT, {"messages": MSGS, "priority": 1}, "priority"),
    (CHAT, {"messages": MSGS, "chat_template": "{{ messages }}"}, "chat_template"),
    (CHAT, {"messages": MSGS, "echo": True}, "echo"),
    (CHAT, {"messages": MSGS, "stream_reasoning": False}, "stream_reasoning"),
    (CHAT, {"messages": MSGS, "input_ids": [1, 2]}, "input_ids"),
    (CHAT, {"messages": MSGS, "mm_processor_kwargs": {"do_resize": False}}, "mm_processor_kwargs"),
    (CHAT, {"messages": MSGS, "rid": 5}, "rid"),
    ("/v1/completions", {"prompt": "x", "lora_path": "a"}, "lora_path"),
    ("/v1/completions", {"prompt": "x", "priority": -2}, "priority"),
    ("/generate", {"text": "x", "image_data": "http://x/a.png"}, "image_data"),
    ("/generate", {"text": "x", "audio_data": ["a.wav"]}, "audio_data"),
    ("/generate", {"text": "x", "return_logprob": True, "logprob_start_len": 0}, "logprob_start_len"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens"),
    ("/generate", {"text": "x", "return_hidden_states": True}, "return_hidden_states"),
])
def test_unimplemented_extras_are_400_not_ignored(server, path, body, param):
    """SGLang / vLLM request fields this server does not implement are refused when set, not served as if
    absent; their defaults (and fields no one defines) pass."""
    st, raw, _ = server.post(path, body)
    assert st == 400, raw
    assert _err(raw)["param"] == param and "not implemented" in _err(raw)["message"] or param == "rid"
    defaults = {"lora_path": None, "priority": 0, "stream_reasoning": True, "echo": False,
                "logprob_start_len": -1, "return_hidden_states": False, "some_new_field": 1}
    st, raw, _ = server.post(CHAT, dict(defaults, messages=MSGS, max_tokens=2))
    assert st == 200, raw


def test_generate_top_logprobs(server):
    for text_too in (False, True):
        st, raw, _ = server.post("/generate", {"text": "hello", "return_logprob": True, "top_logprobs_num": 3,
                                               "return_text_in_logprobs": text_too,
                                               "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
        assert st == 200, raw
        meta = json.loads(raw)["meta_info"]
        toks, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
        assert len(toks) == len(tops) == meta["completion_tokens"] == 4
        for (lp, tid, txt), top in zip(toks, tops):
            assert len(top) == 3 and all(len(e) == 3 for e in top)
            assert top[0][0] >= top[1][0] >= top[2][0] and lp <= top[0][0] + 1e-6
            assert isinstance(txt, str) if text_too else txt is None
            assert all(isinstance(e[2], str) if text_too else e[2] is None for e in top)


def test_vllm_request_id_is_the_rid(server):
    """vLLM's request_id names the request as SGLang's rid does: /abort_request finds it."""
    import threading
    res = {}

    def run():
        res["r"] = server.post("/v1/completions", {"prompt": "go", "request_id": "vllm-id-1", "max_tokens": 60000,
                                                   "ignore_eos": True})
    t = threading.Thread(target=run)
    t.start()
    t_end = time.time() + 5
    while server.load().get("num_running", 0) == 0 and time.time() < t_end:
        time.sleep(0.02)
    st, raw, _ = server.post("/abort_request", {"rid": "vllm-id-1"})     # the request's one sequence
    assert st == 200 and json.loads(raw)["aborted"] == 1
    t.join(10)
    assert json.loads(res["r"][1])["choices"][0]["finish_reason"] == "abort"


def test_body_nesting_and_unpaired_surrogates_are_400(server):
    """Found by fuzzing: 5000 nested arrays (RecursionError) and lone UTF-16 surrogates (in content, a
    prompt, a rid or the model name: encoding errors deep in the tokenizer or the engine link) were 500s
    or a cut stream."""
    deep = b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    st, raw, _ = server.request("POST", CHAT, raw=deep, headers={"Content-Type": "application/json"})
    assert st == 400 and "deeply" in _err(raw)["message"]
    for path, body in ((CHAT, '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
                       ("/v1/completions", '{"prompt": "\\udfff"}'),
                       (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "rid": "\\uD800"}'),
                       (CHAT, '{"model": "\\ud800", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'),
                       ("/generate", b'{"text": "\xed\xa0\x80"}')):
        data = body if isinstance(body, bytes) else body.encode()
        st, raw, _ = server.request("POST", path, raw=data, headers={"Content-Type": "application/json"})
        assert st == 400 and "surrogate" in _err(raw)["message"], (path, body, raw)
    st, raw, _ = server.request("POST", CHAT, raw=b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}],'
                                b' "max_tokens": 2}', headers={"Content-Type": "application/json"})
    assert st == 200, raw                                                    # a pair is an emoji
    _ok_after(server)


def test_same_rid_at_once_is_400_never_500(server):
    """32 requests with one rid at the same time: one runs, the others are 400s (some lost the race after
    the check, inside the front door; they were 500s)."""
    from concurrent.futures import ThreadPoolExecutor
    body = {"messages": MSGS, "rid": "same-rid", "max_tokens": 20}
    with ThreadPoolExecutor(32) as ex:
        codes = list(ex.map(lambda _: server.post(CHAT, body)[0], range(32)))
    assert set(codes) <= {200, 400} and 200 in codes and 400 in codes, codes
    _ok_after(server)


def test_abort_matches_a_request_or_its_sequences_not_a_prefix(server):
    import threading
    res = {}

    def run(name, body):
        res[name] = server.post(CHAT, dict(body, messages=MSGS, max_tokens=60000, ignore_eos=True))
    ts = [threading.Thread(target=run, args=("solo", {"rid": "grp-7"})),
          threading.Thread(target=run, args=("pair", {"rid": "grp", "n": 2, "temperature": 1.0}))]
    for t in ts:
        t.start()
    t_end = time.time() + 5
    while server.load().get("num_running", 0) < 3 and time.time() < t_end:
        time.sleep(0.02)
    st, raw, _ = server.post("/abort_request", {"rid": "grp"})        # the pair's 2 sequences, not "grp-7"
    assert st == 200 and json.loads(raw)["aborted"] == 2
    ts[1].join(10)
    assert [c["finish_reason"] for c in json.loads(res["pair"][1])["choices"]] == ["abort", "abort"]
    assert ts[0].is_alive()
    assert json.loads(server.post("/abort_request", {"rid": "grp-7"})[1])["aborted"] == 1
    ts[0].join(10)
    assert json.loads(res["solo"][1])["choices"][0]["finish_reason"] == "abort"


def test_media_part_message(server):
    st, raw, _ = server.post(CHAT, {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]})
    assert st == 400 and "messages[0].content[0]" in _err(raw)["message"] and "text only" in _err(raw)["message"]


def test_context_overflow_wording(server):
    st, raw, _ = server.post("/v1/completions", {"prompt": [2, 10, 11, 12], "max_tokens": 65536})
    assert st == 400
    m = _err(raw)["message"]
    assert "maximum context length of 65536 tokens" in m
    assert re.search(r"4 tokens from the input messages and 65536 tokens for the completion", m)
    st, raw, _ = server.post("/v1/completions", {"prompt": [5] * 65536, "max_tokens": 1})
    assert st == 400 and "longer than the model's context length" in _err(raw)["message"]
    _ok_after(server)


def test_any_model_name_is_served_and_echoed(server):
    """One model is served: any name selects it and comes back in the response (SGLang's behaviour; the
    reference's recommendation); a name that is not a string is a 400."""
    for name in ("gpt-4o", "default", "gemma4rt-noop", "google/gemma-4-E4B-it"):
        st, raw, _ = server.post(CHAT, {"model": name, "messages": MSGS, "max_tokens": 1})
        assert st == 200 and json.loads(raw)["model"] == name
    st, raw, _ = server.post(CHAT, {"model": 7, "messages": MSGS})
    assert st == 400 and _err(raw)["param"] == "model"


def test_body_limits_and_json(server):
    st, raw, _ = server.post(CHAT, {"messages": [{"role": "user", "content": "x" * 300000}]})
    assert st == 413 and _err(raw)
    st, raw, _ = server.request("POST", CHAT, raw=b"{not json", headers={"Content-Type": "application/json"})
    assert st == 400 and "JSON" in _err(raw)["message"]
    st, raw, _ = server.request("POST", CHAT, raw=b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert st == 400
    st, raw, _ = server.request("POST", CHAT, raw=b"[1,2]", headers={"Content-Type": "application/json"})
    assert st == 400
    assert server.get("/nope")[0] == 404
    _ok_after(server)


def test_64_concurrent_streams(server):
    from openai import AsyncOpenAI

    async def main():
        c = AsyncOpenAI(base_url=server.url + "/v1", api_key="x", _strict_response_validation=True, max_retries=0)

        async def one(i):
            n = 0
            fin = None
            s = await c.chat.completions.create(model="default", messages=[{"role": "user", "content": f"q{i}"}],
                                                max_tokens=12, stream=True, temperature=0.5, seed=i)
            async for ch in s:
                if ch.choices and ch.choices[0].finish_reason:
                    fin = ch.choices[0].finish_reason
                n += 1
            return fin, n
        res = await asyncio.gather(*[one(i) for i in range(64)])
        await c.close()
        return res
    res = asyncio.run(main())
    assert len(res) == 64 and all(f == "length" for f, _ in res)
    server.wait_idle()


def _metric(server, name, label=""):
    text = server.get("/metrics")[1].decode()
    tot = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            tot += float(line.rsplit(" ", 1)[1])
    return tot


def test_disconnect_mid_stream_frees_pages(server):
    aborted0 = _metric(server, "sglang:num_requests_total", 'finish_reason="abort"')
    body = json.dumps({"prompt": "go", "max_tokens": 60000, "ignore_eos": True, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while got.count(b"data:") < 5:
        got += s.recv(4096)
    t_end = time.time() + 5
    while server.load().get("num_running", 0) == 0 and time.time() < t_end:
        time.sleep(0.02)                     # stats come every 50 ms while steps run
    d = server.load()
    assert d["num_running"] == 1 and d["pool_usage"]["full"] > 0
    s.close()
    t0 = time.time()
    d = server.wait_idle(10)
    assert time.time() - t0 < 10 and all(u == 0 for u in d["pool_usage"].values())
    assert _metric(server, "sglang:num_requests_total", 'finish_reason="abort"') == aborted0 + 1


def test_disconnect_non_streaming_aborts(server):
    aborted0 = _metric(server, "sglang:num_requests_total", 'finish_reason="abort"')
    body = json.dumps({"prompt": "go", "max_tokens": 60000, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    t_end = time.time() + 5
    while server.load().get("num_running", 0) == 0 and time.time() < t_end:
        time.sleep(0.02)
    assert server.load()["num_running"] == 1
    s.close()
    t0 = time.time()
    server.wait_idle(10)
    assert time.time() - t0 < 5                       # aborted, not run to its 60000 tokens
    assert _metric(server, "sglang:num_requests_total", 'finish_reason="abort"') == aborted0 + 1


def test_metrics_names(server):
    text = server.get("/metrics")[1].decode()
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:prompt_tokens_total",
                 "sglang:generation_tokens_total", "sglang:time_to_first_token_seconds",
                 "sglang:inter_token_latency_seconds", "sglang:e2e_request_latency_seconds",
                 'sglang:token_usage{model_name="gemma4rt-noop",pool="full"}', "sglang:cache_hit_rate",
                 "sglang:num_requests_total"):
        assert name in text, name
    assert _metric(server, "sglang:generation_tokens_total") > 0


def test_abort_request_endpoint_and_flush(server):
    import threading
    res = {}

    def run():
        res["r"] = server.post("/v1/completions", {"prompt": "go", "max_tokens": 60000, "ignore_eos": True})
    t = threading.Thread(target=run)
    t.start()
    t_end = time.time() + 5
    while server.load().get("num_running", 0) == 0 and time.time() < t_end:
        time.sleep(0.02)
    st, raw, _ = server.post("/abort_request", {"abort_all": True})
    assert st == 200 and json.loads(raw)["aborted"] == 1
    t.join(10)
    st, raw, _ = res["r"]
    assert st == 200 and json.loads(raw)["choices"][0]["finish_reason"] == "abort"
    assert server.post("/flush_cache", {})[0] == 200
    server.wait_idle(timeout=1.5)         # stopped in the engine too, not left to run its 60000 tokens


@pytest.mark.parametrize("body", [{"input_ids": ""}, {"input_ids": "12"}, {"input_ids": []}, {"input_ids": [[]]},
                                  {"input_ids": [1, "a"]}, {"text": 5}, {"text": []}, {}])
def test_generate_bad_prompt_is_400(server, body):
    st, raw, _ = server.post("/generate", dict(body, sampling_params={"max_new_tokens": 2}))
    assert st == 400, raw
    assert _err(raw)["param"] in ("input_ids", "text")
    _ok_after(server)
