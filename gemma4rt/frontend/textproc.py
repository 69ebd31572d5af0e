"""Incremental detokenization and stop strings, per sequence.

`IncrementalDetokenizer.add(ids)` returns the newly final text and never emits half a UTF-8 character
(text ending in U+FFFD is held until the next token completes it). A run of invalid bytes cannot be
held for ever: after MAX_HELD tokens without a complete character the held text goes out with its
U+FFFD replacements (a character needs at most 4 byte tokens, so valid text is never split).
`StopStrings.feed(text)` holds back the longest tail that could still become a stop string, finds stops
across token boundaries, and trims them unless include_stop_str_in_output."""
from __future__ import annotations

from typing import Optional

_REPL = "\ufffd"
MAX_HELD = 8       # tokens held at most while the text ends in an incomplete UTF-8 sequence

try:
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:            # older tokenizers
    _DecodeStream = None


class IncrementalDetokenizer:
    """Uses the Rust `tokenizers.decoders.DecodeStream` when the tokenizer is a fast one (about 3 us
    per token), else re-decodes a short window of ids per step."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, prefix_ids: Optional[list[int]] = None):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prefix_ids or [])
        self.prefix_offset = len(self.ids)    # decode window start (context for merges)
        self.read_offset = len(self.ids)      # tokens up to here are already emitted
        self._backend = getattr(tokenizer, "_tokenizer", None) if _DecodeStream is not None else None
        self._stream = None
        if self._backend is not None:
            self._stream = _DecodeStream(skip_special_tokens=skip_special_tokens)
            if prefix_ids:
                for t in prefix_ids:
                    self._stream.step(self._backend, t)

    def _stream_step(self, t: int, n: int) -> Optional[str]:
        """Token t, the sequence then n ids long, through the stream: its text, or None while a character is
        unfinished; past MAX_HELD held tokens they are invalid bytes, not an unfinished character, so they are
        let out as they decode and the stream restarts."""
        piece = self._stream.step(self._backend, t)
        if piece is None and n - self.read_offset > MAX_HELD:
            piece = self.tok.decode(self.ids[self.read_offset:n], skip_special_tokens=self.skip)
            self._stream = _DecodeStream(skip_special_tokens=self.skip)
        if piece is not None:
            self.read_offset = n
        return piece

    def add(self, new_ids: list[int]) -> str:
        if self._stream is not None:
            ids = self.ids
            if len(new_ids) == 1:                 # one token a step (every decode step): no list, no join
                ids.append(new_ids[0])
                return self._stream_step(new_ids[0], len(ids)) or ""
            base = len(ids)
            ids.extend(new_ids)
            pieces = (self._stream_step(t, base + j + 1) for j, t in enumerate(new_ids))
            return "".join(p for p in pieces if p is not None)
        self.ids.extend(new_ids)
        dec = self.tok.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full = dec(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(full) <= len(prefix) or (full.endswith(_REPL) and len(self.ids) - self.read_offset <= MAX_HELD):
            return ""                          # an incomplete UTF-8 sequence: wait for more tokens
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta

    def flush(self) -> str:
        """At the end: whatever is left (an incomplete UTF-8 tail becomes U+FFFD)."""
        if self.read_offset >= len(self.ids):
            return ""
        tail = self.ids[self.read_offset:]
        self.read_offset = len(self.ids)
        if self._stream is not None:
            return self.tok.decode(tail, skip_special_tokens=self.skip)
        dec = self.tok.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset - len(tail)], skip_special_tokens=self.skip)
        full = dec(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        return full[len(prefix):]


class StopStrings:
    def __init__(self, stops: list[str], include_in_output: bool = False):
        self.stops = [s for s in stops if s]
        self.include = include_in_output
        self.buf = ""                 # text received but not released yet
        self.matched: Optional[str] = None
        self._firsts = frozenset(s[0] for s in self.stops)
        # the usual single stop string (or several with one first character): one `in` test per feed
        self._first = next(iter(self._firsts)) if len(self._firsts) == 1 else None

    def feed(self, text: str, final: bool = False) -> str:
        """Returns text safe to emit. After a match, `matched` is set and the rest is dropped."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        if not self.buf:
            c = self._first
            if c is not None:
                if c not in text:
                    return text        # nothing here can start a stop string
            elif not any(c in text for c in self._firsts):
                return text
        self.buf += text
        best = None
        for s in self.stops:
            i = self.buf.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.matched = s
            out = self.buf[:i + len(s)] if self.include else self.buf[:i]
            self.buf = ""
            return out
        if final:
            out, self.buf = self.buf, ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out = self.buf[:len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold:]
        return out
