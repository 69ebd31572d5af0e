"""The `gemma4` reasoning parser: splits model output into reasoning (thought channel) and content.

Input is decoded text with control tokens kept literally. Tag-driven rules (openai-api-surface.md
§2, gemma4rt recommendation):

- reasoning starts at `<|channel>`; a directly following `thought\\n` label is stripped (also when
  `thought` and `\\n` arrive in different chunks; a look-alike such as `thousand` is kept);
- reasoning ends at `<channel|>` (the tag is dropped) or at `<|tool_call>` (the tag and the call
  belong to content);
- text before any tag is content. When thinking was requested, an end tag `<channel|>` that comes
  before any other tag makes the text before it reasoning (the prompt opened the channel). Because
  that can only be decided when a tag arrives, with thinking requested the *leading* untagged text is
  held back until the first tag or the end of the stream (the model normally starts with
  `<|channel>`, so nothing is held in practice). Pass `start_in_reasoning=True` instead when the
  rendered prompt itself ends inside an open thought channel: then reasoning streams at once;
- a stream that ends inside the thought channel is all reasoning, content None/empty;
- inside a tool call (`<|tool_call>` ... `<tool_call|>`) nothing is interpreted: it is content;
- a stray `<channel|>` in content is dropped, a `<|channel>` inside reasoning re-opens the channel
  (its label is stripped again). Reasoning and content text are returned as-is (not stripped).

Streaming: `ReasoningStreamParser.feed()` returns events and holds back only text that could still
become a tag or the label; the concatenated deltas of any chunking equal `parse_reasoning()`.
"""
from __future__ import annotations

from typing import Optional, Union

from gemma4rt.parsers.events import (
    CHANNEL_END,
    CHANNEL_START,
    THOUGHT_LABEL,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ContentDelta,
    ReasoningDelta,
    find_first,
    longest_partial_suffix,
)

ReasoningEvent = Union[ReasoningDelta, ContentDelta]

# states
_CONTENT = "content"        # visible text
_UNDECIDED = "undecided"    # thinking requested, no tag seen yet: text held
_LABEL = "label"            # just after <|channel>: maybe a `thought\n` label
_REASONING = "reasoning"    # inside the thought channel
_IN_CALL = "in_call"        # inside <|tool_call> ... <tool_call|> (content, uninterpreted)

_TAGS = {
    _CONTENT: (CHANNEL_START, CHANNEL_END, TOOL_CALL_START),
    _UNDECIDED: (CHANNEL_START, CHANNEL_END, TOOL_CALL_START),
    _REASONING: (CHANNEL_END, TOOL_CALL_START, CHANNEL_START),
    _IN_CALL: (TOOL_CALL_END,),
}


class ReasoningStreamParser:
    """Incremental reasoning/content splitter. One instance per choice of one request."""

    def __init__(self, thinking_requested: bool = False, *, start_in_reasoning: bool = False):
        if start_in_reasoning:
            self._state = _LABEL
        elif thinking_requested:
            self._state = _UNDECIDED
        else:
            self._state = _CONTENT
        self._buf = ""
        self._held: list[str] = []      # text of the _UNDECIDED state
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """True while the output is inside the thought channel."""
        return self._state in (_LABEL, _REASONING)

    def feed(self, delta_text: str) -> list[ReasoningEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta_text
        return self._drain(final=False)

    def finish(self) -> list[ReasoningEvent]:
        """End of the stream: flush what was held back."""
        if self._finished:
            return []
        events = self._drain(final=True)
        self._finished = True
        return events

    # ------------------------------------------------------------------------------------------

    def _drain(self, final: bool) -> list[ReasoningEvent]:
        out: list[ReasoningEvent] = []
        while True:
            state = self._state
            if state == _LABEL:
                buf = self._buf
                if buf.startswith(THOUGHT_LABEL):
                    self._buf = buf[len(THOUGHT_LABEL):]
                    self._state = _REASONING
                    continue
                if not final and len(buf) < len(THOUGHT_LABEL) and THOUGHT_LABEL.startswith(buf):
                    break   # the label may still be forming (incl. an empty buffer)
                self._state = _REASONING
                continue
            tags = _TAGS[state]
            pos, tag = find_first(self._buf, tags)
            if tag is None:
                keep = 0 if final else longest_partial_suffix(self._buf, tags)
                cut = len(self._buf) - keep
                self._emit(out, state, self._buf[:cut])
                self._buf = self._buf[cut:]
                if final and state == _UNDECIDED:
                    self._flush_held(out, reasoning=False)
                break
            self._emit(out, state, self._buf[:pos])
            self._buf = self._buf[pos + len(tag):]
            self._transition(out, state, tag)
        return out

    def _transition(self, out: list[ReasoningEvent], state: str, tag: str) -> None:
        if state == _IN_CALL:                       # tag == TOOL_CALL_END
            self._emit(out, _CONTENT, tag)
            self._state = _CONTENT
        elif tag == CHANNEL_START:
            if state == _UNDECIDED:
                self._flush_held(out, reasoning=False)
            self._state = _LABEL
        elif tag == CHANNEL_END:
            if state == _UNDECIDED:
                self._flush_held(out, reasoning=True)
            self._state = _CONTENT                  # stray end tag in content: dropped
        else:                                       # TOOL_CALL_START ends reasoning
            if state == _UNDECIDED:
                self._flush_held(out, reasoning=False)
            self._emit(out, _CONTENT, tag)
            self._state = _IN_CALL

    def _flush_held(self, out: list[ReasoningEvent], reasoning: bool) -> None:
        text = "".join(self._held)
        self._held.clear()
        self._emit(out, _REASONING if reasoning else _CONTENT, text)

    def _emit(self, out: list[ReasoningEvent], state: str, text: str) -> None:
        if not text:
            return
        if state == _UNDECIDED:
            self._held.append(text)
            return
        cls = ReasoningDelta if state in (_REASONING, _LABEL) else ContentDelta
        if out and type(out[-1]) is cls:
            out[-1] = cls(out[-1].text + text)
        else:
            out.append(cls(text))


def parse_reasoning(
    text: str, thinking_requested: bool = False, *, start_in_reasoning: bool = False
) -> tuple[Optional[str], Optional[str]]:
    """Whole-text split: (reasoning or None if empty, content or None if empty)."""
    parser = ReasoningStreamParser(thinking_requested, start_in_reasoning=start_in_reasoning)
    events = parser.feed(text) + parser.finish()
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return reasoning or None, content or None
