"""The `gemma4` tool-call parser (openai-api-surface.md §3).

Wire format: `<|tool_call>call:NAME{ARGS}<tool_call|>`, calls back to back; ARGS in Gemma syntax
(gemma_syntax.py); NAME made of letters, digits, `_`, `-`, `.`.

Content = all text outside well-formed calls, kept verbatim (normally the text before the first
call; callers may strip it). A call that is malformed, or unterminated when the text ends, is
returned *as content* (its raw text, tags included) — never an exception.

Streaming (`ToolCallStreamParser`): ContentDelta for text outside calls (a trailing partial
`<|tool_call>` is held back); ToolCallStart(index, id, name) once `call:NAME{` is complete;
ToolCallArgsDelta pieces that are never taken back (only the stable prefix of the re-parsed partial
ARGS is sent); at `<tool_call|>` the rest is flushed and ToolCallEnd(index, ok=True) follows, so the
pieces concatenate to exactly json.dumps(args, ensure_ascii=False). If a started call turns out
malformed, or `finish()` is called inside it, its raw text is emitted as a ContentDelta followed by
ToolCallEnd(index, ok=False) — the same content the whole-text parser returns; the consumer should
discard that index's pieces. A malformed header (`<|tool_call>` not followed by `call:NAME{`) never
starts a call: it streams as content. Indexes count started calls: 0, 1, 2, ...
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from gemma4rt.parsers.events import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    ContentDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    find_first,
    longest_partial_suffix,
    new_tool_call_id,
)
from gemma4rt.parsers.gemma_syntax import (
    GemmaSyntaxError,
    gemma_args_to_json,
    partial_gemma_args_json,
)

ToolEvent = Union[ContentDelta, ToolCallStart, ToolCallArgsDelta, ToolCallEnd]

_HEADER = re.compile(r"\s*call:([A-Za-z0-9_.\-]+)\{")
_HEADER_PREFIX = re.compile(r"\s*(?:c(?:a(?:l(?:l(?::[A-Za-z0-9_.\-]*)?)?)?)?)?\Z")


@dataclass
class ToolCall:
    name: str
    arguments: str                 # JSON text of the arguments object
    id: str = field(default_factory=new_tool_call_id)

    @property
    def arguments_json(self) -> str:
        return self.arguments


def parse_call_body(body: str) -> tuple[str, str]:
    """`call:NAME{ARGS}` (the text between the tags) -> (name, arguments JSON).
    Raises GemmaSyntaxError."""
    m = _HEADER.match(body)
    if m is None:
        raise GemmaSyntaxError("tool call must look like call:NAME{...}")
    return m.group(1), gemma_args_to_json(body[m.end() - 1:])


def parse_tool_calls(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """Whole text -> (content or None if empty, well-formed calls in order). Never raises."""
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        s = text.find(TOOL_CALL_START, pos)
        if s < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:s])
        e = text.find(TOOL_CALL_END, s + len(TOOL_CALL_START))
        if e < 0:
            content.append(text[s:])            # unterminated call -> content
            break
        try:
            name, args = parse_call_body(text[s + len(TOOL_CALL_START):e])
            calls.append(ToolCall(name, args))
        except GemmaSyntaxError:
            content.append(text[s:e + len(TOOL_CALL_END)])
        pos = e + len(TOOL_CALL_END)
    joined = "".join(content)
    return joined or None, calls


_OUTSIDE, _HEAD, _ARGS, _BAD = "outside", "head", "args", "bad"


class ToolCallStreamParser:
    """Incremental tool-call extraction for one choice of one request."""

    def __init__(self):
        self._state = _OUTSIDE
        self._buf = ""          # unprocessed text
        self._body = ""         # text of the current call after <|tool_call>
        self._args_off = 0      # offset of ARGS' `{` in _body
        self._sent = ""         # argument JSON sent for the current call
        self._broken = False    # current call can no longer parse: stop sending pieces
        self._index = -1        # index of the current started call (-1: not started)
        self._num_started = 0
        self._finished = False

    @property
    def num_calls(self) -> int:
        """Calls started so far."""
        return self._num_started

    def feed(self, delta_text: str) -> list[ToolEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta_text
        out: list[ToolEvent] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[ToolEvent]:
        """End of the stream. An unfinished call becomes content (as in parse_tool_calls)."""
        if self._finished:
            return []
        self._finished = True
        out: list[ToolEvent] = []
        if self._state == _OUTSIDE:
            _content(out, self._buf)
        elif self._state == _BAD:               # the call's start was already streamed
            _content(out, self._body + self._buf)
        else:
            _content(out, TOOL_CALL_START + self._body + self._buf)
            if self._index >= 0:
                out.append(ToolCallEnd(self._index, ok=False))
        self._buf = ""
        return out

    # ------------------------------------------------------------------------------------------

    def _step(self, out: list[ToolEvent]) -> bool:
        """Process the buffer once; True if the state changed and another pass is needed."""
        if self._state == _OUTSIDE:
            pos = self._buf.find(TOOL_CALL_START)
            if pos < 0:
                keep = longest_partial_suffix(self._buf, (TOOL_CALL_START,))
                _content(out, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return False
            _content(out, self._buf[:pos])
            self._buf = self._buf[pos + len(TOOL_CALL_START):]
            self._state, self._body, self._sent = _HEAD, "", ""
            self._broken, self._index = False, -1
            return True
        pos, _ = find_first(self._buf, (TOOL_CALL_END,))
        if pos >= 0:
            self._body += self._buf[:pos]
            self._buf = self._buf[pos + len(TOOL_CALL_END):]
            self._end_call(out)
            self._state = _OUTSIDE
            return True
        keep = longest_partial_suffix(self._buf, (TOOL_CALL_END,))
        self._body += self._buf[:len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep:]
        if self._state == _HEAD:
            m = _HEADER.match(self._body)
            if m is not None:
                self._index = self._num_started
                self._num_started += 1
                self._args_off = m.end() - 1
                self._state = _ARGS
                out.append(ToolCallStart(self._index, new_tool_call_id(), m.group(1)))
            elif not _HEADER_PREFIX.match(self._body):
                self._state = _BAD      # not a call: stream it as content
                _content(out, TOOL_CALL_START + self._body)
                self._body = ""
                return False
            else:
                return False
        if self._state == _ARGS:
            self._send_stable(out)
        elif self._state == _BAD:
            _content(out, self._body)
            self._body = ""
        return False

    def _send_stable(self, out: list[ToolEvent]) -> None:
        if self._broken:
            return
        try:
            stable = partial_gemma_args_json(self._body[self._args_off:])
        except GemmaSyntaxError:
            self._broken = True
            return
        if len(stable) > len(self._sent) and stable.startswith(self._sent):
            out.append(ToolCallArgsDelta(self._index, stable[len(self._sent):]))
            self._sent = stable

    def _end_call(self, out: list[ToolEvent]) -> None:
        if self._state == _BAD:
            _content(out, self._body + TOOL_CALL_END)
            return
        final: Optional[str] = None
        if self._state == _HEAD:                # header and end arrived in one piece
            m = _HEADER.match(self._body)
            if m is not None:
                self._index = self._num_started
                self._num_started += 1
                self._state = _ARGS
                out.append(ToolCallStart(self._index, new_tool_call_id(), m.group(1)))
        if self._state == _ARGS:
            try:
                _, final = parse_call_body(self._body)
            except GemmaSyntaxError:
                final = None
        if final is not None and final.startswith(self._sent):
            if len(final) > len(self._sent):
                out.append(ToolCallArgsDelta(self._index, final[len(self._sent):]))
            out.append(ToolCallEnd(self._index, ok=True))
            return
        _content(out, TOOL_CALL_START + self._body + TOOL_CALL_END)
        if self._index >= 0:
            out.append(ToolCallEnd(self._index, ok=False))


def _content(out: list[ToolEvent], text: str) -> None:
    if not text:
        return
    if out and type(out[-1]) is ContentDelta:
        out[-1] = ContentDelta(out[-1].text + text)
    else:
        out.append(ContentDelta(text))


def to_gemma_tool_call(name: str, arguments: dict) -> str:
    """Render one call in the wire format (history rendering, tests)."""
    from gemma4rt.parsers.gemma_syntax import to_gemma_args
    return f"{TOOL_CALL_START}call:{name}{to_gemma_args(arguments)}{TOOL_CALL_END}"
