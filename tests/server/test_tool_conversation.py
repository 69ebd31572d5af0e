"""A multi-turn tool conversation renders through the checkpoint's chat template in Gemma's format
(OpenAI JSON-string arguments become call syntax, `role: tool` results become tool responses), and an
OpenAI SDK tool loop runs end to end against the server."""
import asyncio
import json

import pytest

from gemma4rt.frontend.chat import _messages
from gemma4rt.frontend.errors import APIError
from gemma4rt.frontend.tokenizer import TokenizerManager
from gemma4rt.tools.tiny_checkpoint import demo_checkpoint_path

from .conftest import Server

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}]


def _render(messages):
    tm = TokenizerManager(str(demo_checkpoint_path()))
    text, _ = asyncio.run(tm.render_chat(_messages({"messages": messages}), TOOLS, {"add_generation_prompt": True}))
    return text


def test_tool_round_trip_renders_gemma_syntax():
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": '{"temp_c": 21}'}]}]
    text = _render(msgs)
    assert '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>' in text
    assert '<|tool_response>response:get_weather{value:<|"|>{"temp_c": 21}<|"|>}<tool_response|>' in text
    assert "<|tool>declaration:get_weather" in text


@pytest.mark.parametrize("args", ['{"city": ', '[1, 2]'])
def test_bad_tool_call_arguments_are_400(args):
    msgs = [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                  "function": {"name": "f", "arguments": args}}]}]
    with pytest.raises(APIError) as e:
        _messages({"messages": msgs})
    assert e.value.status == 400 and "arguments" in e.value.message


def test_sdk_tool_loop():
    from openai import OpenAI
    s = Server("--context-length", "1024", "--tool-call-parser", "gemma4", "--reasoning-parser", "gemma4",
               timeout=300)
    try:
        c = OpenAI(base_url=s.url + "/v1", api_key="x", _strict_response_validation=True, max_retries=0)
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        r = c.chat.completions.create(model="default", messages=msgs, tools=TOOLS, tool_choice="required",
                                      temperature=0, max_tokens=60)
        call = r.choices[0].message.tool_calls[0]
        msgs += [r.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
        r2 = c.chat.completions.create(model="default", messages=msgs, tools=TOOLS, max_tokens=8, temperature=0)
        # the second prompt holds the first turn's call and the result
        assert r2.usage.prompt_tokens > r.usage.prompt_tokens + r.usage.completion_tokens
        assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        s.stop()


CONTROL = ("<turn|>", "<|turn>", "<eos>", "<pad>", "<|tool_response>", "<tool_response|>", "<bos>")


def test_streamed_equals_whole_across_parsers():
    """Random-model outputs through both parsers, with tools auto/required, stop strings and thinking on
    or off: the streamed content, reasoning, tool calls and finish reason equal the whole response's, and
    no control token (the closing `<turn|>` and the like) shows in the content or the reasoning."""
    from openai import OpenAI
    s = Server("--context-length", "1024", "--tool-call-parser", "gemma4", "--reasoning-parser", "gemma4",
               timeout=300)
    try:
        c = OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        for seed in range(8):
            kw = dict(model="default", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS,
                      temperature=1.0, seed=seed, max_tokens=40, tool_choice=["auto", "required"][seed % 2],
                      stop=["ab"] if seed % 3 == 0 else None,
                      extra_body={"chat_template_kwargs": {"enable_thinking": seed % 4 == 1}})
            w = c.chat.completions.create(**kw).choices[0]
            content, reasoning, calls, fin = "", "", {}, None
            for ch in c.chat.completions.create(stream=True, **kw):
                if not ch.choices:
                    continue
                d = ch.choices[0].delta
                content += d.content or ""
                reasoning += getattr(d, "reasoning_content", None) or ""
                for t in d.tool_calls or []:
                    e = calls.setdefault(t.index, {"name": None, "args": ""})
                    e["name"] = t.function.name or e["name"]
                    e["args"] += t.function.arguments or ""
                fin = ch.choices[0].finish_reason or fin
            assert (w.message.content or "") == content, seed
            assert not any(t in content or t in reasoning for t in CONTROL), (seed, content, reasoning)
            assert (getattr(w.message, "reasoning_content", None) or "") == reasoning, seed
            assert [(t.function.name, t.function.arguments) for t in (w.message.tool_calls or [])] == \
                [(e["name"], e["args"]) for _, e in sorted(calls.items())], seed
            assert w.finish_reason == fin, seed
    finally:
        s.stop()
