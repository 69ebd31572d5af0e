import random

import pytest

from gemma4rt.parsers import ContentDelta, ReasoningDelta, ReasoningStreamParser, parse_reasoning

# (model output, thinking requested, expected reasoning, expected content)
CASES = [
    ("This is content", False, None, "This is content"),
    ("This is content", True, None, "This is content"),          # untagged -> content
    ("<|channel>thought\nA<channel|>B", True, "A", "B"),
    ("<|channel>thought\nA<channel|>B", False, "A", "B"),         # spurious channel never leaks
    ("<|channel>thought\n<channel|>", True, None, None),           # empty thought
    ("<|channel>A", True, "A", None),                              # truncated, no label
    ("<|channel>thought\nlong thinking", True, "long thinking", None),
    ("A<channel|>B", True, "A", "B"),                              # end tag without start
    ("A<channel|>B", False, None, "AB"),                           # not requested: tag dropped
    ("Before\n<|channel>A<channel|>\nRest", True, "A", "Before\n\nRest"),
    ("<|channel>thousand reasons<channel|>Done", True, "thousand reasons", "Done"),
    ("<|channel>thought<channel|>x", True, "thought", "x"),        # label without newline kept
    ("<|channel>thought", True, "thought", None),
    ("<|channel>thought\n", True, None, None),
    ("<|tool_call>call:f{}<tool_call|>", True, None, "<|tool_call>call:f{}<tool_call|>"),
    ("<|channel>thought\nplan<|tool_call>call:f{a:1}<tool_call|>", True, "plan",
     "<|tool_call>call:f{a:1}<tool_call|>"),
    ("<|channel>thought\nA<channel|>B<|channel>thought\nC<channel|>D", True, "AC", "BD"),
    ("x<|tool_call>call:f{a:<|\"|><channel|><|\"|>}<tool_call|>y", True, None,
     "x<|tool_call>call:f{a:<|\"|><channel|><|\"|>}<tool_call|>y"),  # tags in a call are literal
    ("<|channel>thought\nA<|channel>thought\nB<channel|>C", False, "AB", "C"),
    ("a < b <| c <chan", True, None, "a < b <| c <chan"),
    ("", True, None, None),
]


def _stream(text, thinking, chunks, start_in_reasoning=False):
    p = ReasoningStreamParser(thinking, start_in_reasoning=start_in_reasoning)
    events = []
    for c in chunks:
        events += p.feed(c)
    events += p.finish()
    r = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    c = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert all(e.text for e in events)
    return r or None, c or None, events


@pytest.mark.parametrize("text,thinking,reasoning,content", CASES)
def test_whole_table(text, thinking, reasoning, content):
    assert parse_reasoning(text, thinking) == (reasoning, content)


@pytest.mark.parametrize("text,thinking,reasoning,content", CASES)
def test_every_two_chunk_split(text, thinking, reasoning, content):
    for k in range(len(text) + 1):
        r, c, _ = _stream(text, thinking, [text[:k], text[k:]])
        assert (r, c) == (reasoning, content), k


@pytest.mark.parametrize("text,thinking,reasoning,content", CASES)
def test_random_chunkings(text, thinking, reasoning, content):
    rng = random.Random(sum(map(ord, text)) + len(text))
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        r, c, _ = _stream(text, thinking, chunks)
        assert (r, c) == (reasoning, content)
    r, c, _ = _stream(text, thinking, list(text))       # one char at a time
    assert (r, c) == (reasoning, content)


def test_label_split_across_chunks_is_stripped():
    p = ReasoningStreamParser(True)
    assert p.feed("<|channel>") == []
    assert p.feed("thought") == []              # could still be the label
    assert p.feed("\n") == []
    assert p.feed("Hmm") == [ReasoningDelta("Hmm")]
    assert p.feed("<channel|>ok") == [ContentDelta("ok")]


def test_lookalike_label_is_released():
    p = ReasoningStreamParser(False)
    assert p.feed("<|channel>thou") == []
    assert p.feed("sand") == [ReasoningDelta("thousand")]


def test_partial_tag_never_emitted_as_content():
    p = ReasoningStreamParser(False)
    assert p.feed("Hello <|chan") == [ContentDelta("Hello ")]
    assert p.feed("nel>thought\nx") == [ReasoningDelta("x")]
    p = ReasoningStreamParser(False)
    assert p.feed("Hi <|tool") == [ContentDelta("Hi ")]
    assert p.feed("_call>") == [ContentDelta("<|tool_call>")]


def test_content_streams_immediately_without_thinking():
    p = ReasoningStreamParser(False)
    assert p.feed("Hello") == [ContentDelta("Hello")]


def test_thinking_requested_holds_untagged_prefix_until_decided():
    p = ReasoningStreamParser(True)
    assert p.feed("abc") == []
    assert p.feed("<channel|>d") == [ReasoningDelta("abc"), ContentDelta("d")]
    p = ReasoningStreamParser(True)
    assert p.feed("abc") == []
    assert p.finish() == [ContentDelta("abc")]


def test_start_in_reasoning_streams_at_once():
    p = ReasoningStreamParser(True, start_in_reasoning=True)
    assert p.feed("step one") == [ReasoningDelta("step one")]
    assert p.feed("<channel|>answer") == [ContentDelta("answer")]
    assert parse_reasoning("thought\nA<channel|>B", start_in_reasoning=True) == ("A", "B")
    assert parse_reasoning("A", start_in_reasoning=True) == ("A", None)


def test_in_reasoning_flag():
    p = ReasoningStreamParser(False)
    p.feed("<|channel>thought\nx")
    assert p.in_reasoning
    p.feed("<channel|>")
    assert not p.in_reasoning


def test_random_texts_streamed_equals_whole():
    rng = random.Random(7)
    pieces = ["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "thought", "\n",
              "thou", "abc", "<", "<|", "é✓", " ", "call:f{}"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        for thinking in (False, True):
            whole = parse_reasoning(text, thinking)
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 4)))
            chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            r, c, _ = _stream(text, thinking, chunks)
            assert (r, c) == whole, (text, chunks)
            # reasoning + content never contains the channel tags
            for part in whole:
                assert part is None or ("<|channel>" not in part and "<channel|>" not in part
                                        or "<|tool_call>" in part)


def test_feed_after_finish_raises():
    p = ReasoningStreamParser()
    p.finish()
    with pytest.raises(RuntimeError):
        p.feed("x")
