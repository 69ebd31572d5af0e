"""Our Gemma 4 chat template, rendered through transformers' apply_chat_template (openai-api-surface.md §1)."""

import pytest

from gemma4rt.tools.tiny_tokenizer import build_tiny_tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city name"},
                "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
WEATHER_DECL = (
    '<|tool>declaration:get_weather{description:<|"|>Get the current weather<|"|>,parameters:{properties:{'
    'location:{description:<|"|>The city name<|"|>,type:<|"|>STRING<|"|>},unit:{description:<|"|>Temperature unit'
    '<|"|>,enum:[<|"|>celsius<|"|>,<|"|>fahrenheit<|"|>],type:<|"|>STRING<|"|>}},required:[<|"|>location<|"|>],'
    'type:<|"|>OBJECT<|"|>}}<tool|>'
)
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"location": "Tokyo"}}}
TOOL_CONV = [
    {"role": "user", "content": "What's the weather in Tokyo?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def render(tok, messages, **kw):
    kw.setdefault("add_generation_prompt", True)
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_thinking_off_and_on(tok):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert render(tok, msgs) == (
        "<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert render(tok, msgs, enable_thinking=False) == render(tok, msgs)
    assert render(tok, msgs, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nYou are terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )


def test_no_system_turn_without_system_tools_or_thinking(tok):
    msgs = [{"role": "user", "content": "  Hi there \n"}]
    assert render(tok, msgs) == "<bos><|turn>user\nHi there<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert render(tok, msgs, add_generation_prompt=False) == "<bos><|turn>user\nHi there<turn|>\n"
    assert render(tok, msgs, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi there<turn|>\n<|turn>model\n"
    )


def test_tool_declaration(tok):
    out = render(tok, [{"role": "user", "content": "Hi"}], tools=[WEATHER_TOOL])
    assert out.startswith("<bos><|turn>system\n" + WEATHER_DECL + "<turn|>\n<|turn>user\nHi<turn|>\n")


def test_tool_conversation(tok):
    assert render(tok, TOOL_CONV, tools=[WEATHER_TOOL]) == (
        "<bos><|turn>system\n" + WEATHER_DECL + "<turn|>\n"
        "<|turn>user\nWhat's the weather in Tokyo?<turn|>\n"
        "<|turn>model\n"
        '<|tool_call>call:get_weather{location:<|"|>Tokyo<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>{"temperature": 22}<|"|>}<tool_response|>'
    )


def test_call_without_results_ends_with_bare_response_opener(tok):
    out = render(tok, TOOL_CONV[:2])
    assert out.endswith('<|tool_call>call:get_weather{location:<|"|>Tokyo<|"|>}<tool_call|><|tool_response>')


def test_final_answer_continues_the_model_turn(tok):
    msgs = TOOL_CONV + [{"role": "assistant", "content": "It is 22 degrees."}, {"role": "user", "content": "Thanks"}]
    out = render(tok, msgs)
    assert out.count("<|turn>model\n") == 2  # the tool turn and the generation prompt
    assert out.endswith(
        '<tool_response|>It is 22 degrees.<turn|>\n<|turn>user\nThanks<turn|>\n<|turn>model\n<|channel>thought\n<channel|>'
    )


def test_arguments_dict_nested_and_string(tok):
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": {
        "b": [1, 2.5, True, None], "a": {"y": "s", "x": False}}}}
    out = render(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}])
    assert '<|tool_call>call:f{a:{x:false,y:<|"|>s<|"|>},b:[1,2.5,true,null]}<tool_call|><|tool_response>' in out
    call["function"]["arguments"] = '{"a": 1}'
    out = render(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}])
    assert '<|tool_call>call:f{{"a": 1}}<tool_call|>' in out


def test_tool_response_forms(tok):
    calls = [CALL, {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "10:"}, {"type": "text", "text": "30"}]},
        {"role": "tool", "tool_call_id": "nope", "name": "other", "content": "x"},
        {"role": "tool", "tool_call_id": "nope", "content": "y"},
    ]
    out = render(tok, msgs)
    assert out.endswith(
        '<|tool_call>call:get_time{}<tool_call|>'
        '<|tool_response>response:get_time{value:<|"|>10:30<|"|>}<tool_response|>'
        '<|tool_response>response:other{value:<|"|>x<|"|>}<tool_response|>'
        '<|tool_response>response:unknown{value:<|"|>y<|"|>}<tool_response|>'
    )
    legacy = [{"role": "user", "content": "q"},
              {"role": "assistant", "tool_calls": [CALL], "tool_responses": [{"name": "get_weather", "response": {"t": 22, "u": "c"}}]}]
    assert render(tok, legacy).endswith('<|tool_response>response:get_weather{t:22,u:<|"|>c<|"|>}<tool_response|>')


def test_reasoning_kept_only_in_current_tool_loop(tok):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<|channel>thought\nold<channel|>Answer A", "reasoning_content": "old"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "reasoning": "need weather", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = render(tok, msgs, enable_thinking=True)
    assert "old" not in out
    assert "<|turn>model\nAnswer A<turn|>\n" in out
    assert '<|turn>model\n<|channel>thought\nneed weather\n<channel|><|tool_call>call:get_weather' in out
    assert out.endswith("<tool_response|>")


def test_system_developer_and_media(tok):
    msgs = [
        {"role": "developer", "content": [{"type": "text", "text": " Be brief. "}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe. "}, {"type": "audio"},
                                     {"type": "video"}]},
        {"role": "system", "content": "late"},
    ]
    assert render(tok, msgs, add_generation_prompt=False) == (
        "<bos><|turn>system\nBe brief. <turn|>\n<|turn>user\n<|image|>Describe.<|audio|><|video|><turn|>\n"
        "<|turn>system\nlate<turn|>\n"
    )


def test_rendered_prompt_tokenizes_with_one_bos(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[:2] == [2, 105] and ids.count(2) == 1
    tail = [105] + tok.encode("model\n") + [100] + tok.encode("thought\n") + [101]
    assert ids[-len(tail):] == tail
