import json
import random
import re

import pytest

from gemma4rt.parsers import (
    ContentDelta,
    GemmaSyntaxError,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolCallStreamParser,
    parse_gemma_args,
    parse_tool_calls,
    partial_gemma_args_json,
    to_gemma_args,
    to_gemma_tool_call,
)

D = '<|"|>'


def call(name, args):
    return f"<|tool_call>call:{name}{args}<tool_call|>"


# (text, expected content, [(name, args dict)])
CASES = [
    ("Just text.", "Just text.", []),
    (call("get_weather", "{location:" + D + "Paris" + D + "}"), None,
     [("get_weather", {"location": "Paris"})]),
    ("Let me check." + call("f", "{}"), "Let me check.", [("f", {})]),
    (call("a", "{x:1}") + call("b", "{y:" + D + "two" + D + "}"), None,
     [("a", {"x": 1}), ("b", {"y": "two"})]),
    (call("f", "{s:" + D + 'a, {b} [c] "q" \\ \n z' + D + "}"), None,
     [("f", {"s": 'a, {b} [c] "q" \\ \n z'})]),
    (call("f", "{n:42,x:3.14,neg:-7,e:1e3,t:true,fa:false,nu:null,no:none,ni:nil}"), None,
     [("f", {"n": 42, "x": 3.14, "neg": -7, "e": 1000.0, "t": True, "fa": False, "nu": None,
             "no": None, "ni": None})]),
    (call("f", "{o:{p:{q:[1,[2,3],{r:" + D + "s" + D + "}]}},empty:[],eo:{}}"), None,
     [("f", {"o": {"p": {"q": [1, [2, 3], {"r": "s"}]}}, "empty": [], "eo": {}})]),
    (call("f", "{" + D + "1" + D + ":" + D + "one" + D + "," + D + "a:b" + D + ":2}"), None,
     [("f", {"1": "one", "a:b": 2})]),                               # delimited keys
    (call("my-tool.v2_x", "{}"), None, [("my-tool.v2_x", {})]),
    (call("f", "{city:" + D + "東京 ✓ 🌧" + D + "}"), None, [("f", {"city": "東京 ✓ 🌧"})]),
    (call("f", "{a:}"), None, [("f", {"a": ""})]),                   # key with no value
    (call("f", "{a:,b:1}"), None, [("f", {"a": "", "b": 1})]),
    (call("f", "{a:" + D + "unterminated}"), None, [("f", {"a": "unterminated"})]),
    (call("f", "{a:hello world,b:007}"), None, [("f", {"a": "hello world", "b": "007"})]),
    (call("f", "{ a : 1 , b : [ 1 , 2 ] , }"), None, [("f", {"a": 1, "b": [1, 2]})]),
    # unterminated call -> content
    ("Hi <|tool_call>call:f{a:1}", "Hi <|tool_call>call:f{a:1}", []),
    ("<|tool_call>call:f{a:" + D + "x", "<|tool_call>call:f{a:" + D + "x", []),
    # malformed calls -> content, the good one still parsed
    (call("f", "{a:1}}") + call("g", "{}"), call("f", "{a:1}}"), [("g", {})]),
    (call("f", "{a:1,a:2}"), call("f", "{a:1,a:2}"), []),         # duplicate key
    ("<|tool_call>hello<tool_call|>", "<|tool_call>hello<tool_call|>", []),
    ("<|tool_call>call:bad name{}<tool_call|>", "<|tool_call>call:bad name{}<tool_call|>", []),
    (call("f", "{a:[1,,2]}"), call("f", "{a:[1,,2]}"), []),
    (call("f", "{a:1 b:2}x"), call("f", "{a:1 b:2}x"), []),
    (call("f", "{a:1}") + "\nafter", "\nafter", [("f", {"a": 1})]),
    ("<|tool_ca", "<|tool_ca", []),
]


def _stream(chunks):
    p = ToolCallStreamParser()
    events = []
    for c in chunks:
        events += p.feed(c)
    events += p.finish()
    return events


def _collect(events):
    content, calls, args, ok = [], {}, {}, {}
    for e in events:
        if isinstance(e, ContentDelta):
            assert e.text
            content.append(e.text)
        elif isinstance(e, ToolCallStart):
            assert e.index == len(calls) and re.fullmatch(r"call_[0-9a-f]{24}", e.id)
            calls[e.index] = e.name
            args[e.index] = ""
        elif isinstance(e, ToolCallArgsDelta):
            assert e.index in calls and e.index not in ok and e.text
            args[e.index] += e.text
        elif isinstance(e, ToolCallEnd):
            assert e.index in calls and e.index not in ok
            ok[e.index] = e.ok
    done = [(calls[i], args[i]) for i in sorted(calls) if ok.get(i)]
    return ("".join(content) or None), done


def _expected(content, calls):
    return content, [(n, json.dumps(a, ensure_ascii=False)) for n, a in calls]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_whole_table(text, content, calls):
    c, got = parse_tool_calls(text)
    assert (c, [(t.name, t.arguments) for t in got]) == _expected(content, calls)
    for t in got:
        assert re.fullmatch(r"call_[0-9a-f]{24}", t.id)
        assert t.arguments_json == t.arguments


@pytest.mark.parametrize("text,content,calls", CASES)
def test_every_two_chunk_split(text, content, calls):
    want = _expected(content, calls)
    for k in range(len(text) + 1):
        assert _collect(_stream([text[:k], text[k:]])) == want, k


@pytest.mark.parametrize("text,content,calls", CASES)
def test_random_chunkings(text, content, calls):
    want = _expected(content, calls)
    rng = random.Random(len(text) * 31 + 5)
    for _ in range(25):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert _collect(_stream(chunks)) == want
    assert _collect(_stream(list(text))) == want


def test_args_stream_incrementally_and_withhold_unstable_values():
    p = ToolCallStreamParser()
    ev = p.feed("Sure.<|tool_call>call:get_weather{")
    assert ev[0] == ContentDelta("Sure.")
    assert isinstance(ev[1], ToolCallStart) and ev[1].name == "get_weather" and ev[1].index == 0
    assert ev[2:] == [ToolCallArgsDelta(0, "{")]
    assert p.feed("flag:tru") == [ToolCallArgsDelta(0, '"flag": ')]   # `tru` withheld
    assert p.feed("e,n:108.") == [ToolCallArgsDelta(0, 'true, "n": ')]   # `108.` withheld
    assert p.feed("2") == []
    assert p.feed(",s:" + D + "ab<|") == [ToolCallArgsDelta(0, '108.2, "s": "ab')]
    assert p.feed('"|>') == [ToolCallArgsDelta(0, '"')]
    assert p.feed("}") == [ToolCallArgsDelta(0, "}")]
    assert p.feed("<tool_call|>") == [ToolCallEnd(0, True)]


def test_partial_tool_call_tag_not_emitted_as_content():
    p = ToolCallStreamParser()
    assert p.feed("Hello <|tool") == [ContentDelta("Hello ")]
    assert p.feed("_c") == []
    assert p.feed("x") == [ContentDelta("<|tool_cx")]


def test_fragments_are_never_retracted_random():
    rng = random.Random(3)
    for _ in range(200):
        args = _random_value(rng, depth=0, force_dict=True)
        text = to_gemma_tool_call("fn", args)
        chunks, i = [], 0
        while i < len(text):
            j = i + rng.randint(1, 6)
            chunks.append(text[i:j])
            i = j
        p = ToolCallStreamParser()
        sent = ""
        final = json.dumps(args, ensure_ascii=False)
        for c in chunks:
            for e in p.feed(c):
                if isinstance(e, ToolCallArgsDelta):
                    sent += e.text
                    assert final.startswith(sent)          # every piece is a stable prefix
        p.finish()
        assert sent == final


def test_stream_cut_inside_call_becomes_content():
    p = ToolCallStreamParser()
    ev = p.feed("<|tool_call>call:f{a:1,")
    assert isinstance(ev[0], ToolCallStart)
    ev = p.finish()
    assert ev == [ContentDelta("<|tool_call>call:f{a:1,"), ToolCallEnd(0, False)]
    assert parse_tool_calls("<|tool_call>call:f{a:1,") == ("<|tool_call>call:f{a:1,", [])


def test_indexes_are_sequential():
    text = call("a", "{}") + call("b", "{}") + call("a", "{x:1}")
    starts = [e for e in _stream([text]) if isinstance(e, ToolCallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "a"), (1, "b"), (2, "a")]
    assert len({s.id for s in starts}) == 3


def _random_string(rng):
    alphabet = list("abc XYZ,{}[]:\"'\\\n\t<|>é東🌧") + ["<tool", "<|\"", "}"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))).replace(D, "")


def _random_value(rng, depth, force_dict=False):
    kind = "dict" if force_dict else rng.choice(
        ["str", "int", "float", "bool", "null", "list", "dict"] if depth < 3 else
        ["str", "int", "float", "bool", "null"])
    if kind == "str":
        return _random_string(rng)
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice([0.5, -2.25, 1e-7, 3.14159, 1e20, -0.0])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["a", "b_c", "x-y", "k.1", "with space", "1", "é"]
    return {rng.choice(keys) + str(i): _random_value(rng, depth + 1)
            for i in range(rng.randint(0, 4))}


def test_round_trip_to_gemma_and_back():
    rng = random.Random(11)
    for _ in range(500):
        v = _random_value(rng, 0, force_dict=True)
        g = to_gemma_args(v)
        assert parse_gemma_args(g) == v
        # the JSON text is exactly json.dumps
        c, calls = parse_tool_calls(to_gemma_tool_call("t", v))
        assert c is None and calls[0].arguments == json.dumps(v, ensure_ascii=False)


def test_to_gemma_args_format():
    assert to_gemma_args({"location": "Tokyo", "n": 2, "ok": True, "z": None, "l": [1.5, "a"]}) \
        == "{location:" + D + "Tokyo" + D + ",n:2,ok:true,z:null,l:[1.5," + D + "a" + D + "]}"
    assert to_gemma_args({"b": 1, "a": 2}, sort_keys=True) == "{a:2,b:1}"
    assert to_gemma_args({"a:b": 1}) == "{" + D + "a:b" + D + ":1}"
    with pytest.raises(ValueError):
        to_gemma_args({"a": "contains " + D})
    with pytest.raises(TypeError):
        to_gemma_args([1])


def test_syntax_errors_and_partial_prefix():
    for bad in ["", "x", "{a:1", "{a:1}}", "{,}", "{a:{b:1}", "[1]", "{a:[1}", "{a:" + D + "x" + D + "y}"]:
        with pytest.raises(GemmaSyntaxError):
            parse_gemma_args(bad)
    assert partial_gemma_args_json("{a:" + D + "x}") == '{"a": "x'
    assert partial_gemma_args_json("{a:[1,2") == '{"a": [1, '
    assert parse_gemma_args("{a:1 2:3}") == {"a": "1 2:3"}       # unknown bare word -> string
    with pytest.raises(GemmaSyntaxError):
        partial_gemma_args_json("{a:1}x")


def test_random_texts_streamed_equals_whole():
    rng = random.Random(5)
    pieces = ["<|tool_call>", "<tool_call|>", "call:", "f", "get-x.y", "{", "}", "[", "]", ",",
              ":", D, "<|\"", "a", "1", "2.", "tru", "e", " ", "\n", "<", "<tool", "é"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 16)))
        if rng.random() < 0.5:
            text = "<|tool_call>call:f{" + text
        want = parse_tool_calls(text)
        want = (want[0], [(t.name, t.arguments) for t in want[1]])
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert _collect(_stream(chunks)) == want, (text, chunks)


def test_reasoning_then_tool_parser_pipeline():
    from gemma4rt.parsers import ReasoningDelta, ReasoningStreamParser, parse_reasoning
    text = ("<|channel>thought\nI should call it.<channel|>Calling."
            + call("get_weather", "{city:" + D + "Paris" + D + ",days:3}") + call("f", "{}"))
    reasoning, content = parse_reasoning(text, True)
    assert reasoning == "I should call it."
    c, calls = parse_tool_calls(content)
    assert c == "Calling." and [t.name for t in calls] == ["get_weather", "f"]
    rng = random.Random(9)
    for _ in range(50):
        rp, tp = ReasoningStreamParser(True), ToolCallStreamParser()
        r, events = "", []
        i = 0
        while i <= len(text):
            j = i + rng.randint(1, 5)
            out = rp.feed(text[i:j]) if i < len(text) else rp.finish()
            for e in out:
                if isinstance(e, ReasoningDelta):
                    r += e.text
                else:
                    events += tp.feed(e.text)
            i = j if i < len(text) else i + 1
        for e in rp.finish():
            events += tp.feed(e.text) if not isinstance(e, ReasoningDelta) else []
        events += tp.finish()
        assert r == reasoning
        assert _collect(events) == (c, [(t.name, t.arguments) for t in calls])
