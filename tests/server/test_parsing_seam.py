"""The chat route's parser seam (frontend/parsing.py) with the gemma4 reasoning parser."""
from gemma4rt.frontend.parsing import OutputParser, parsers_available


def test_reasoning_split_streaming_equals_whole():
    text = "<|channel>thought\nI think.<channel|>The answer."
    whole = OutputParser(True, False, thinking=True, tools=None).feed(text, final=True)
    assert whole.reasoning == "I think." and whole.content == "The answer."
    p = OutputParser(True, False, thinking=True, tools=None)
    parts = [p.feed(text[i:i + 3]) for i in range(0, len(text), 3)] + [p.feed("", final=True)]
    assert "".join(x.reasoning for x in parts) == whole.reasoning
    assert "".join(x.content for x in parts) == whole.content


def test_no_parser_is_passthrough():
    p = OutputParser(False, False, thinking=False, tools=None)
    assert not p.active and p.feed("<|channel>x", final=True).content == "<|channel>x"
    assert parsers_available(None, None) == {"reasoning": False, "tool": False}


def test_tool_calls_through_the_seam():
    from gemma4rt.parsers import tool_calls as tc
    call = tc.to_gemma_tool_call("get_weather", {"location": "Paris"})
    text = "Sure. " + call
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    p = OutputParser(True, True, thinking=False, tools=tools)
    parts = [p.feed(text[i:i + 4]) for i in range(0, len(text), 4)] + [p.feed("", final=True)]
    assert "".join(x.content for x in parts).strip() == "Sure."
    calls = p.whole_tool_calls()
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    import json
    assert json.loads(calls[0]["function"]["arguments"]) == {"location": "Paris"}
    assert calls[0]["id"].startswith("call_") and p.num_calls_ok == 1
    deltas = [d for x in parts for d in x.tool_calls]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["type"] == "function"
    assert "".join(d["function"].get("arguments", "") for d in deltas) == calls[0]["function"]["arguments"]


def test_one_tool_call_entry_per_index_and_chunk():
    """A chunk that carries a call's name and the start of its arguments holds one entry for that index
    (vLLM's layout), as does a chunk with several argument pieces; two calls keep two entries."""
    from gemma4rt.parsers import tool_calls as tc
    tools = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in ("f", "g")]
    text = tc.to_gemma_tool_call("f", {"a": 1, "b": "x y"}) + tc.to_gemma_tool_call("g", {"c": [1, 2]})
    for step in (len(text), 7, 1):
        p = OutputParser(False, True, thinking=False, tools=tools)
        parts = [p.feed(text[i:i + step]) for i in range(0, len(text), step)] + [p.feed("", final=True)]
        for x in parts:
            idx = [d["index"] for d in x.tool_calls]
            assert len(idx) == len(set(idx)), (step, x.tool_calls)
        calls = p.whole_tool_calls()
        assert [c["function"]["name"] for c in calls] == ["f", "g"]
        for i, c in enumerate(calls):
            args = "".join(d["function"].get("arguments", "") for x in parts for d in x.tool_calls if d["index"] == i)
            assert args == c["function"]["arguments"]


def test_reasoning_token_count():
    """usage.reasoning_tokens counts the thought channel's tokens: `<|channel>` through `<channel|>`."""
    OPEN, CLOSE = 7, 8
    p = OutputParser(True, False, thinking=True, tools=None, channel_ids=(OPEN, CLOSE))
    p.count([OPEN, 1, 2])
    p.count([3, CLOSE, 4, 5, OPEN])
    assert p.reasoning_tokens == 5
    q = OutputParser(True, False, thinking=True, tools=None, channel_ids=(OPEN, CLOSE))
    q.count([1, OPEN, 2])                     # no leading channel: no thought
    assert q.reasoning_tokens == 0
    u = OutputParser(True, False, thinking=True, tools=None, channel_ids=(OPEN, CLOSE))
    u.count([OPEN] + [1] * 9)                 # cut off inside the thought: all of it
    assert u.reasoning_tokens == 10


def test_text_mode():
    """Which special tokens reach the text: all for a request that keeps them; the tags but not the control
    tokens where a parser reads them or the client asked for them unparsed; none otherwise."""
    from gemma4rt.frontend.chat import text_mode
    ctl = frozenset({1, 106})
    assert text_mode(True, False, False, False, ctl) == (True, frozenset())          # plain text
    assert text_mode(True, True, False, False, ctl) == (False, ctl)                  # parsers on
    assert text_mode(True, False, True, False, ctl) == (False, ctl)                  # tools, no tool parser
    assert text_mode(True, False, False, True, ctl) == (False, ctl)                  # separate_reasoning false
    assert text_mode(False, True, False, False, ctl) == (False, frozenset())         # skip_special_tokens false
