"""The front door's use of the output parsers (gemma4rt.parsers): reasoning and tool calls.

`OutputParser` turns one choice's text deltas into (reasoning, content, tool-call) pieces: the
reasoning parser (--reasoning-parser gemma4) runs first, the tool-call parser (--tool-call-parser
gemma4, only when the request has tools) reads the content it leaves. Streaming and whole responses
go through the same code, so they agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from gemma4rt.parsers import (
    ContentDelta, ReasoningDelta, ReasoningStreamParser, ToolCallArgsDelta, ToolCallEnd, ToolCallStart,
    ToolCallStreamParser,
)

KNOWN_PARSERS = ("gemma4", "auto")


def parsers_available(reasoning: Optional[str], tool: Optional[str]) -> dict:
    for flag, name in (("--reasoning-parser", reasoning), ("--tool-call-parser", tool)):
        if name and name not in KNOWN_PARSERS:
            raise ValueError(f"{flag} {name!r}: only {', '.join(KNOWN_PARSERS)} is available")
    return {"reasoning": bool(reasoning), "tool": bool(tool)}


@dataclass
class Parsed:
    reasoning: str = ""
    content: str = ""
    tool_calls: list = field(default_factory=list)     # OpenAI delta tool_calls entries


class OutputParser:
    def __init__(self, reasoning: bool, tool: bool, thinking: bool, tools: Optional[list],
                 include_reasoning: bool = True, channel_ids: Optional[tuple[int, int]] = None):
        self.r = ReasoningStreamParser(thinking) if reasoning else None
        self.include_reasoning = include_reasoning     # False: the thought is parsed out and dropped
        self._channel = channel_ids                    # (`<|channel>` id, `<channel|>` id)
        self._in_thought: Optional[bool] = None
        self.reasoning_tokens = 0
        self.t = ToolCallStreamParser() if tool and tools else None
        self.num_calls_ok = 0
        self.calls: dict[int, dict] = {}           # index -> {"id","name","arguments","ok"} (whole view)

    def count(self, ids: list[int]) -> None:
        """Count output tokens of the thought channel (for usage.reasoning_tokens): from a leading
        `<|channel>` through its `<channel|>`, or to the end when the channel never closes."""
        if self.r is None or self._channel is None:
            return
        open_id, close_id = self._channel
        for t in ids:
            if self._in_thought is None:
                self._in_thought = t == open_id
            if not self._in_thought:
                return
            self.reasoning_tokens += 1
            if t == close_id:
                self._in_thought = False
                return

    @property
    def active(self) -> bool:
        return self.r is not None or self.t is not None

    def feed(self, text: str, final: bool = False) -> Parsed:
        out = Parsed()
        if self.r is not None:
            evs = (self.r.feed(text) if text else []) + (self.r.finish() if final else [])
            content = ""
            for e in evs:
                if isinstance(e, ReasoningDelta):
                    if self.include_reasoning:
                        out.reasoning += e.text
                else:
                    content += e.text
        else:
            content = text
        if self.t is None:
            out.content += content
            return out
        evs = (self.t.feed(content) if content else []) + (self.t.finish() if final else [])
        for e in evs:
            if isinstance(e, ContentDelta):
                out.content += e.text
            elif isinstance(e, ToolCallStart):
                self.calls[e.index] = {"id": e.id, "name": e.name, "arguments": "", "ok": False}
                out.tool_calls.append({"index": e.index, "id": e.id, "type": "function",
                                       "function": {"name": e.name, "arguments": ""}})
            elif isinstance(e, ToolCallArgsDelta):
                self.calls[e.index]["arguments"] += e.text
                last = out.tool_calls[-1] if out.tool_calls else None
                if last is not None and last["index"] == e.index:     # one entry per call and chunk
                    last["function"]["arguments"] += e.text
                else:
                    out.tool_calls.append({"index": e.index, "function": {"arguments": e.text}})
            elif isinstance(e, ToolCallEnd):
                if e.index in self.calls:
                    self.calls[e.index]["ok"] = e.ok
                if e.ok:
                    self.num_calls_ok += 1
        return out

    def whole_tool_calls(self) -> list[dict]:
        return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for _, c in sorted(self.calls.items()) if c["ok"]]
