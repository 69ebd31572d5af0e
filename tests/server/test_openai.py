"""The OpenAI surface of a real server process (NoopRunner engine), through the openai SDK with
strict response validation."""
import json

import openai
import pytest

MSG = [{"role": "user", "content": "Say something."}]


def test_models(client, server):
    ms = client.models.list()
    assert [m.id for m in ms.data] == ["gemma4rt-noop"]
    assert client.models.retrieve("gemma4rt-noop").id == "gemma4rt-noop"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_basic(client):
    r = client.chat.completions.create(model="gemma4rt-noop", messages=MSG, max_tokens=6, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    r2 = client.chat.completions.create(model="default", messages=MSG, max_tokens=6, temperature=0)
    assert r2.choices[0].message.content == c.message.content            # greedy is deterministic


def test_completions_basic(client, server):
    r = client.completions.create(model="gemma4rt-noop", prompt="Once upon", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    tok = json.loads(server.post("/v1/tokenize", {"prompt": "Once upon"})[1])["tokens"]
    assert tok[0] == 2 and tok.count(2) == 1 and r.usage.prompt_tokens == len(tok)   # one <bos> prepended
    r2 = client.completions.create(model="gemma4rt-noop", prompt="<bos>Once upon", max_tokens=1, temperature=0)
    assert r2.usage.prompt_tokens == len(tok)                                         # not twice
    batch = client.completions.create(model="gemma4rt-noop", prompt=["a b", "c d"], max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.completion_tokens == 6
    ids = client.completions.create(model="gemma4rt-noop", prompt=[2, 10, 11], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_chat_stream_with_usage(client):
    chunks = list(client.chat.completions.create(
        model="gemma4rt-noop", messages=MSG, max_tokens=7, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    fins = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(fins) == 1 and fins[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="gemma4rt-noop", messages=MSG, max_tokens=7, temperature=0)
    assert text == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1


def test_completions_stream(client, loose_client):
    chunks = list(loose_client.completions.create(model="gemma4rt-noop", prompt="x", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model="gemma4rt-noop", prompt="x", max_tokens=5, temperature=0)
    assert text == whole.choices[0].text


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="gemma4rt-noop", messages=MSG, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and isinstance(e.bytes, list)
    s = list(client.chat.completions.create(model="gemma4rt-noop", messages=MSG, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True))
    n = sum(len(c.choices[0].logprobs.content) for c in s if c.choices and c.choices[0].logprobs)
    assert n == 4


def test_completion_logprobs_and_echo(client, server):
    r = client.completions.create(model="gemma4rt-noop", prompt="hello", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and len(lp.top_logprobs) == 3
    assert lp.text_offset == sorted(lp.text_offset)
    # echo: prompt logprobs come first and the first is null (the strict SDK types reject null)
    st, body, _ = server.post("/v1/completions", {"prompt": "hello", "max_tokens": 3, "temperature": 0,
                                                  "echo": True, "logprobs": 1})
    assert st == 200
    c = json.loads(body)["choices"][0]
    assert c["text"].startswith("hello")
    n_prompt = json.loads(body)["usage"]["prompt_tokens"]
    assert len(c["logprobs"]["tokens"]) == n_prompt + 3
    assert c["logprobs"]["token_logprobs"][0] is None and c["logprobs"]["token_logprobs"][1] is not None
    # offsets index the echoed text: the prompt's <bos> (left out of it) takes no room
    text, toks, offs = c["text"], c["logprobs"]["tokens"], c["logprobs"]["text_offset"]
    assert offs == sorted(offs) and offs[-1] < len(text)
    for t, o in zip(toks, offs):
        assert t == "<bos>" or text[o:o + len(t)] == t, (t, o, text)


def test_n_and_seed(client):
    kw = dict(model="gemma4rt-noop", messages=MSG, max_tokens=8, temperature=1.0, seed=1234, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    ta = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert ta == [c.message.content for c in b.choices]                   # reproducible
    assert len(set(ta)) > 1                                                  # seed + i per choice
    assert a.usage.completion_tokens == 24
    s = list(client.chat.completions.create(**kw, stream=True))
    assert sorted(c.choices[0].index for c in s if c.choices and c.choices[0].finish_reason) == [0, 1, 2]


def test_stop_strings(client, loose_client):
    base = dict(model="gemma4rt-noop", prompt="abc", temperature=0)
    full = client.completions.create(**base, max_tokens=20).choices[0].text
    stop = full[5:8]
    cut = full[:full.find(stop)]
    r = client.completions.create(**base, max_tokens=20, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    r = client.completions.create(**base, max_tokens=20, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == cut + stop
    s = list(loose_client.completions.create(**base, max_tokens=20, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in s if c.choices) == cut
    assert [c.choices[0].finish_reason for c in s if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_prefix_cache_hit(client):
    msgs = [{"role": "user", "content": "A long shared prefix " * 20}]
    a = client.chat.completions.create(model="gemma4rt-noop", messages=msgs, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model="gemma4rt-noop", messages=msgs, max_tokens=6, temperature=0)
    assert b.usage.prompt_tokens_details.cached_tokens > 0
    assert b.usage.prompt_tokens_details.cached_tokens < b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


def test_sampling_fields_accepted(client):
    r = client.chat.completions.create(
        model="gemma4rt-noop", messages=MSG, max_completion_tokens=3, temperature=0.7, top_p=0.9,
        frequency_penalty=0.5, presence_penalty=0.1, logit_bias={"10": 1.0},
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 2,
                    "stop_token_ids": [7], "ignore_eos": True, "unknown_field_is_ignored": 1})
    assert r.usage.completion_tokens <= 3


def test_native_generate_and_tokenize(server):
    st, body, _ = server.post("/v1/tokenize", {"prompt": "hello"})
    ids = json.loads(body)["tokens"]
    assert st == 200 and ids[0] == 2
    st, body, _ = server.post("/v1/detokenize", {"tokens": ids})
    assert json.loads(body)["prompt"] == "<bos>hello"
    st, body, _ = server.post("/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    out = json.loads(body)
    assert st == 200 and out["meta_info"]["completion_tokens"] == 4
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    st, body, _ = server.post("/generate", {"text": "hello", "stream": True,
                                            "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    events = [json.loads(l[6:]) for l in body.decode().split("\n\n") if l.startswith("data: {")]
    assert events[-1]["text"] == out["text"]                               # cumulative text
    assert all(out["text"].startswith(e["text"]) for e in events)


def test_continuous_usage_and_reasoning_knobs(server, client):
    """stream_options.continuous_usage_stats puts running usage in every chunk (chat and completions);
    reasoning_effort maps onto enable_thinking (rendered into the prompt by the template);
    include_reasoning false drops the thought; separate_reasoning false keeps it in content."""
    chunks = list(client.chat.completions.create(
        model="gemma4rt-noop", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 6 and all(c.usage is not None for c in chunks)
    n_prompt = chunks[-1].usage.prompt_tokens
    assert n_prompt > 0 and all(c.usage.prompt_tokens == n_prompt for c in chunks)     # the role chunk's too
    raw = server.post("/v1/completions", {"model": "gemma4rt-noop", "prompt": "x", "max_tokens": 4, "stream": True,
                                          "stream_options": {"continuous_usage_stats": True}})[1].decode()
    ev = [json.loads(x[6:]) for x in raw.split("\n\n") if x.startswith("data: {")]
    assert ev and all("usage" in e for e in ev) and ev[-1]["usage"]["completion_tokens"] == 4

    def prompt_len(**kw):
        body = dict({"model": "gemma4rt-noop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, **kw)
        st, out, _ = server.post("/v1/chat/completions", body)
        assert st == 200, out
        return json.loads(out)["usage"]["prompt_tokens"]
    base = prompt_len()
    on = prompt_len(chat_template_kwargs={"enable_thinking": True})
    assert on != base
    assert prompt_len(reasoning_effort="high") == on and prompt_len(reasoning_effort="none") == base
    assert prompt_len(reasoning={"enabled": True}) == on
    assert prompt_len(reasoning_effort="high", chat_template_kwargs={"enable_thinking": False}) == base


def test_reasoning_output_knobs():
    from gemma4rt.frontend.parsing import OutputParser
    text = "<|channel>thought\nhmm<channel|>Answer."
    r = OutputParser(True, False, True, None, include_reasoning=False).feed(text, final=True)
    assert r.reasoning == "" and r.content == "Answer."
    r = OutputParser(False, False, True, None).feed(text, final=True)           # separate_reasoning false
    assert r.content == text


def test_ping_is_liveness(server):
    assert server.get("/ping")[0] == 200 and server.post("/ping")[0] == 200


def test_completions_best_of(server):
    """best_of candidates per prompt, the n of highest total log-probability returned (usage counts every
    candidate): the same as asking for all best_of with their log-probabilities and keeping the top n."""
    base = {"model": "default", "prompt": ["Once", "Twice"], "max_tokens": 6, "temperature": 1.0, "seed": 5,
            "ignore_eos": True}
    st, body, _ = server.post("/v1/completions", dict(base, n=2, best_of=4))
    assert st == 200, body
    r = json.loads(body)
    st, body, _ = server.post("/v1/completions", dict(base, n=4, logprobs=0))
    allc = json.loads(body)["choices"]
    want = []
    for p in range(2):
        cands = allc[4 * p:4 * p + 4]
        best = sorted(cands, key=lambda c: -sum(c["logprobs"]["token_logprobs"]))[:2]
        want += [c["text"] for c in best]
    assert [c["text"] for c in r["choices"]] == want and [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["choices"][0]["logprobs"] is None and r["usage"]["completion_tokens"] == 2 * 4 * 6
    for bad, needle in (({"n": 3, "best_of": 2}, "best_of"), ({"best_of": 3, "stream": True}, "best_of"),
                        ({"suffix": "end"}, "suffix")):
        st, body, _ = server.post("/v1/completions", dict(base, **bad))
        assert st == 400 and needle in json.loads(body)["error"]["message"], body


def test_generate_refuses_what_it_does_not_implement(server):
    """SGLang's native sampling_params that would change the output are refused, not ignored; its
    sampling_seed is the seed."""
    for sp, needle in (({"stop_regex": "a+"}, "stop_regex"), ({"structural_tag": {}}, "structural_tag"),
                       ({"n": 2}, "'sampling_params.n'")):
        st, body, _ = server.post("/generate", {"text": "x", "sampling_params": sp})
        assert st == 400 and needle in json.loads(body)["error"]["message"], body
    outs = []
    for sp in ({"sampling_seed": 11}, {"seed": 11}, {"sampling_seed": 12}):
        st, body, _ = server.post("/generate", {"text": "x", "sampling_params": dict(
            sp, temperature=1.0, max_new_tokens=8, ignore_eos=True)})
        outs.append(json.loads(body)["output_ids"])
    assert outs[0] == outs[1] != outs[2]


def test_server_info_version_and_invocations(server):
    """SGLang's /get_server_info (the settings, version and scheduler state), /version, and SageMaker's
    /invocations route (chat completions)."""
    import gemma4rt
    from gemma4rt.cli import parse_args
    from gemma4rt.server import server_args

    st, body, _ = server.get("/get_server_info")
    info = json.loads(body)
    assert st == 200 and info["version"] == gemma4rt.__version__
    assert info["engine"]["runner"] == "noop" and info["engine"]["scheduler"]["max_running_requests"] == 96
    assert info["engine"]["scheduler"]["overlap_schedule"] is True and info["server"]["enable_metrics"]
    assert info["internal_states"][0]["healthy"] is True       # (the /get_load figures)
    assert info["max_total_num_tokens"] > 0 and info["kv_pool_tokens"], info
    st, body, _ = server.get("/version")
    assert st == 200 and json.loads(body) == {"version": gemma4rt.__version__}
    st, body, _ = server.post("/invocations", {"model": "default", "max_tokens": 3,
                                               "messages": [{"role": "user", "content": "hi"}]})
    assert st == 200 and json.loads(body)["object"] == "chat.completion", body
    eng, srv, _ = parse_args(["--api-key", "sekrit"])
    assert "sekrit" not in json.dumps(server_args(eng, srv)) and server_args(eng, srv)["server"]["port"] == 30000
    from gemma4rt.server import kv_info
    assert kv_info({"sliding": 10, "full": 40}, {"sliding": 16, "full": 16}) == {
        "kv_pool_tokens": {"sliding": 160, "full": 640}, "max_total_num_tokens": 640}


def test_usage_reports_reasoning_tokens_with_the_reasoning_parser(client):
    r = client.chat.completions.create(model="gemma4rt-noop", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3)
    assert r.usage.completion_tokens_details.reasoning_tokens == 0      # the noop model never thinks
