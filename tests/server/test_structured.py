"""Structured output and forced tool calls end to end: the demo model (a tiny random Gemma 4) behind
`python -m gemma4rt.server`, sampled at temperature 1, must still produce schema-valid JSON and
parseable tool calls because the grammar masks its logits."""
import json

import pytest

from .conftest import Server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "color"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 8},
                                          "unit": {"type": "string", "enum": ["c", "f"]}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}},
]
MSG = [{"role": "user", "content": "Give me the data."}]


def valid(obj) -> bool:
    if not isinstance(obj, dict) or set(obj) - set(SCHEMA["properties"]) or not set(SCHEMA["required"]) <= set(obj):
        return False
    ok = isinstance(obj["name"], str) and len(obj["name"]) <= 6
    ok &= isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 120
    ok &= isinstance(obj["ok"], bool) and obj["color"] in ("red", "green", "blue")
    if "tags" in obj:
        ok &= isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and all(isinstance(t, bool) for t in obj["tags"])
    return bool(ok)


@pytest.fixture(scope="module", params=["sync", "overlap"])
def srv(request):
    """The demo model's server, synchronous (the CPU default) and with overlap scheduling (a GPU's)."""
    extra = ("--enable-overlap-schedule",) if request.param == "overlap" else ()
    s = Server("--max-running-requests", "16", "--context-length", "1024", *extra, timeout=300)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    from openai import OpenAI
    return OpenAI(base_url=srv.url + "/v1", api_key="x", _strict_response_validation=True, max_retries=0)


def test_json_schema_valid_for_20_seeds_at_temperature_1(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(20):
        r = client.chat.completions.create(model="default", messages=MSG, temperature=1.0, seed=seed,
                                           max_tokens=120, response_format=rf)
        c = r.choices[0]
        assert c.finish_reason == "stop", (seed, c.message.content)
        assert valid(json.loads(c.message.content)), (seed, c.message.content)


def test_json_object_and_completions_extras(client, srv):
    r = client.chat.completions.create(model="default", messages=MSG, temperature=1.0, seed=3, max_tokens=80,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:       # a free-form object may outgrow max_tokens; what came is still a JSON prefix
        assert r.choices[0].message.content.startswith("{")
    st, body, _ = srv.post("/v1/completions", {"model": "default", "prompt": "n=", "max_tokens": 10,
                                               "temperature": 1.0, "seed": 1, "regex": "[0-9]{3}"})
    assert st == 200, body
    assert json.loads(body)["choices"][0]["text"].isdigit() and len(json.loads(body)["choices"][0]["text"]) == 3
    st, body, _ = srv.post("/generate", {"text": "x", "sampling_params": {
        "max_new_tokens": 12, "temperature": 1.0, "ebnf": 'root ::= "yes" | "no"'}})
    assert st == 200 and json.loads(body)["text"] in ("yes", "no"), body


def test_parse_returns_a_parsed_object(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        verdict: Literal["yes", "no", "maybe"]
        score: int = Field(ge=0, le=10)
        sure: bool

    r = client.chat.completions.parse(model="default", messages=MSG, temperature=1.0, seed=7, max_tokens=60,
                                      response_format=Answer)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Answer) and 0 <= parsed.score <= 10


def _calls_ok(calls, names, parallel=True):
    assert calls and (parallel or len(calls) == 1)
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        args = json.loads(c.function.arguments)
        if c.function.name == "get_weather":
            assert isinstance(args["city"], str) and args.get("unit", "c") in ("c", "f")
        else:
            assert isinstance(args["n"], int)


def test_tool_choice_required_and_named(client):
    for seed in range(4):
        r = client.chat.completions.create(model="default", messages=MSG, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=150)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        _calls_ok(c.message.tool_calls, {"get_weather", "ping"})
    r = client.chat.completions.create(model="default", messages=MSG, tools=TOOLS, temperature=1.0, seed=1,
                                       tool_choice={"type": "function", "function": {"name": "ping"}},
                                       parallel_tool_calls=False, max_tokens=150)
    assert r.choices[0].finish_reason == "tool_calls"
    _calls_ok(r.choices[0].message.tool_calls, {"ping"}, parallel=False)


def test_streamed_equals_whole(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    kw = dict(model="default", messages=MSG, temperature=1.0, seed=11, max_tokens=120)
    whole = client.chat.completions.create(response_format=rf, **kw).choices[0].message.content
    parts = [ch.choices[0].delta.content or "" for ch in
             client.chat.completions.create(response_format=rf, stream=True, **kw) if ch.choices]
    assert "".join(parts) == whole and valid(json.loads(whole))

    kw.update(tools=TOOLS, tool_choice="required")
    w = client.chat.completions.create(**kw).choices[0]
    args: dict[int, dict] = {}
    fin = None
    for ch in client.chat.completions.create(stream=True, **kw):
        for d in ch.choices[0].delta.tool_calls or []:
            e = args.setdefault(d.index, {"name": None, "id": None, "arguments": ""})
            if d.id:
                e["id"], e["name"] = d.id, d.function.name
            e["arguments"] += d.function.arguments or ""
        fin = ch.choices[0].finish_reason or fin
    assert fin == w.finish_reason == "tool_calls"
    assert [(a["name"], json.loads(a["arguments"])) for _, a in sorted(args.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in w.message.tool_calls]


def test_constrained_and_free_requests_batch_together(srv):
    """A free request's greedy output is the same alone and beside constrained ones."""
    import concurrent.futures as cf
    free = {"model": "default", "prompt": "hello", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    alone = json.loads(srv.post("/v1/completions", free)[1])["choices"][0]["text"]
    con = {"model": "default", "messages": MSG, "max_tokens": 60, "temperature": 1.0,
           "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
    with cf.ThreadPoolExecutor(4) as ex:
        fs = [ex.submit(srv.post, "/v1/chat/completions", dict(con, seed=i)) for i in range(3)]
        fs.append(ex.submit(srv.post, "/v1/completions", free))
        res = [f.result() for f in fs]
    assert all(st == 200 for st, _, _ in res)
    assert json.loads(res[-1][1])["choices"][0]["text"] == alone
    for st, body, _ in res[:3]:
        c = json.loads(body)["choices"][0]
        if c["finish_reason"] == "stop":
            assert valid(json.loads(c["message"]["content"]))


def test_vllm_structured_outputs_and_guided_fields(srv):
    """vLLM's forms constrain the output as SGLang's do: structured_outputs {choice, regex, json, grammar}
    and the older guided_* fields, on chat and text completions, sampled at temperature 1."""
    choices = ["yes", "no", "a.b (c)"]
    cases = [({"structured_outputs": {"choice": choices}}, lambda t: t in choices),
             ({"guided_choice": choices}, lambda t: t in choices),
             ({"structured_outputs": {"regex": "[0-9]{4}"}}, lambda t: t.isdigit() and len(t) == 4),
             ({"guided_regex": "[a-c]{2}x"}, lambda t: len(t) == 3 and t[2] == "x" and set(t[:2]) <= set("abc")),
             ({"structured_outputs": {"grammar": 'root ::= "up" | "down"'}}, lambda t: t in ("up", "down")),
             ({"guided_json": SCHEMA}, lambda t: valid(json.loads(t)))]
    for i, (extra, ok) in enumerate(cases):
        for route, base in (("/v1/chat/completions", {"messages": MSG}), ("/v1/completions", {"prompt": "n="})):
            body = dict({"model": "default", "max_tokens": 120, "temperature": 1.0, "seed": i}, **base, **extra)
            st, out, _ = srv.post(route, body)
            assert st == 200, out
            c = json.loads(out)["choices"][0]
            text = c["message"]["content"] if "message" in c else c["text"]
            assert c["finish_reason"] == "stop" and ok(text), (extra, route, text)


def test_thinking_token_budget(srv):
    """vLLM's thinking_token_budget through the chat route: a bias makes the demo model open the thought
    channel at every step; with a budget of 0 each opening is followed by the channel's end."""
    base = {"model": "default", "messages": MSG, "max_tokens": 6, "temperature": 0, "logit_bias": {"100": 100},
            "separate_reasoning": False, "skip_special_tokens": False}
    texts = []
    for extra in ({}, {"thinking_token_budget": 0}):
        st, out, _ = srv.post("/v1/chat/completions", dict(base, **extra))
        assert st == 200, out
        texts.append(json.loads(out)["choices"][0]["message"]["content"])
    assert texts[0] == "<|channel>" * 6 and texts[1] == "<|channel><channel|>" * 3, texts
    st, out, _ = srv.post("/v1/chat/completions", dict(base, thinking_token_budget=-1))
    assert st == 400 and "thinking_token_budget" in json.loads(out)["error"]["message"]


@pytest.mark.parametrize("body,needle", [
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "(["}}, "structured_outputs.regex"),
    ({"structured_outputs": {"structural_tag": {"x": 1}}}, "not implemented"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "Only one"),
    ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "not several"),
    ({"structured_outputs": "json"}, "structured_outputs"),
    ({"stop_regex": "\\d+"}, "stop_regex"),
])
def test_bad_vllm_constraints_are_400(srv, body, needle):
    st, out, _ = srv.post("/v1/chat/completions", dict({"model": "default", "messages": MSG}, **body))
    assert st == 400, out
    assert needle in json.loads(out)["error"]["message"], out
    assert srv.get("/health")[0] == 200


@pytest.mark.parametrize("body,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"tool_choice": "required"}, "Tools cannot be empty"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not found"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "parameters"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "combined"),
])
def test_bad_constraints_are_400(srv, body, needle):
    st, out, _ = srv.post("/v1/chat/completions", dict({"model": "default", "messages": MSG}, **body))
    assert st == 400, out
    err = json.loads(out)["error"]
    assert needle in err["message"] and err["code"] == 400, err
    st, out, _ = srv.post("/v1/completions", {"model": "default", "prompt": "x", "regex": "(["})
    assert st == 400 and "regex" in json.loads(out)["error"]["message"]
    assert srv.get("/health")[0] == 200
