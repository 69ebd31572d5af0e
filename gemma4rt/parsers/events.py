"""Gemma 4 control-token strings and the events that the streaming parsers emit.

The parsers work on decoded text in which control tokens are kept as their literal strings
(detokenize with skip_special_tokens=False). Every event is a small frozen dataclass.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"
THOUGHT_LABEL = "thought\n"
TOOL_CALL_START = "<|tool_call>"
TOOL_CALL_END = "<tool_call|>"
STRING_DELIM = '<|"|>'


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """More text of the thought channel (`reasoning_content` / `reasoning`)."""

    text: str


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """More visible text (`content`)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A call's `call:NAME{` is complete. index: ordinal of the call in this output (0, 1, ...)."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArgsDelta:
    """The next piece of a call's JSON arguments; pieces are never taken back."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """A started call ended. ok=True: `<tool_call|>` arrived and the argument pieces sent so far
    form the complete JSON. ok=False: the call was malformed or the stream ended inside it; its raw
    text was emitted as a ContentDelta just before this event (as the whole-text parser returns it),
    and the argument pieces already sent for this index are incomplete."""

    index: int
    ok: bool


def new_tool_call_id() -> str:
    """OpenAI-style call id: `call_` + 24 hex chars."""
    return "call_" + secrets.token_hex(12)


def longest_partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a strict, non-empty prefix of one of `tags`
    (text that could still grow into a tag and must be held back)."""
    best = 0
    longest = max(len(t) for t in tags) - 1
    for k in range(min(len(text), longest), 0, -1):
        tail = text[-k:]
        if any(t.startswith(tail) and len(t) > k for t in tags):
            best = k
            break
    return best


def find_first(text: str, tags: tuple[str, ...], start: int = 0) -> tuple[int, str | None]:
    """(position, tag) of the earliest occurrence of any tag in text[start:], or (-1, None)."""
    pos, found = -1, None
    for t in tags:
        p = text.find(t, start)
        if p >= 0 and (pos < 0 or p < pos):
            pos, found = p, t
    return pos, found
