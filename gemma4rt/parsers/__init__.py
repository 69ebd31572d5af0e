"""parsers: the gemma4 reasoning parser and tool-call parser (streaming and whole). Pure text in,
events out; no I/O, no torch.

Receives decoded text with Gemma 4 control tokens kept literally; emits ReasoningDelta /
ContentDelta / ToolCallStart / ToolCallArgsDelta / ToolCallEnd events (streaming) or
(reasoning, content) and (content, [ToolCall]) (whole text). Run the reasoning parser first and
feed its content to the tool-call parser."""
from gemma4rt.parsers.events import (
    CHANNEL_END,
    CHANNEL_START,
    STRING_DELIM,
    THOUGHT_LABEL,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ContentDelta,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    new_tool_call_id,
)
from gemma4rt.parsers.gemma_syntax import (
    GemmaSyntaxError,
    gemma_args_to_json,
    parse_gemma_args,
    partial_gemma_args_json,
    to_gemma_args,
    to_gemma_value,
)
from gemma4rt.parsers.reasoning import ReasoningStreamParser, parse_reasoning
from gemma4rt.parsers.tool_calls import (
    ToolCall,
    ToolCallStreamParser,
    parse_call_body,
    parse_tool_calls,
    to_gemma_tool_call,
)

__all__ = [
    "CHANNEL_END", "CHANNEL_START", "STRING_DELIM", "THOUGHT_LABEL", "TOOL_CALL_END",
    "TOOL_CALL_START", "ContentDelta", "ReasoningDelta", "ToolCallArgsDelta", "ToolCallEnd",
    "ToolCallStart", "new_tool_call_id", "GemmaSyntaxError", "gemma_args_to_json",
    "parse_gemma_args", "partial_gemma_args_json", "to_gemma_args", "to_gemma_value",
    "ReasoningStreamParser", "parse_reasoning", "ToolCall", "ToolCallStreamParser",
    "parse_call_body", "parse_tool_calls", "to_gemma_tool_call",
]
