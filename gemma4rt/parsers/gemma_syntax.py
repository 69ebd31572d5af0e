"""Gemma 4's non-JSON argument syntax (openai-api-surface.md §3.1) <-> JSON.

`{key:value,...}`: bare keys (or `<|"|>`-wrapped), strings `<|"|>...<|"|>` (literal, no escapes),
numbers, true/false, null (none/nil -> null), objects, arrays, `{}`. Leniencies: whitespace between
tokens, a trailing comma, `key:` with no value -> "", a bare word that is not a number or keyword
-> string, an unterminated string takes the rest of the arguments (minus one final `}`) and closes
every open container. Duplicate keys are an error.

The parser writes the JSON text directly (same bytes as json.dumps(value, ensure_ascii=False)).
In partial mode it stops at the end of the input and returns only the prefix that can no longer
change, which is what the streaming tool-call parser sends.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from gemma4rt.parsers.events import STRING_DELIM

_D = STRING_DELIM
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?\Z")
_BARE_END = re.compile(r"[,}\]]")
_CLOSE_TAIL = re.compile(r"\}\s*\Z")
_WS = " \t\r\n"
_KEY_FORBIDDEN = set("{}[],")


class GemmaSyntaxError(ValueError):
    """The text is not valid Gemma argument syntax."""


class _Incomplete(Exception):
    pass


def _dumps(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _bare_json(tok: str) -> str:
    low = tok.lower()
    if low in ("true", "false"):
        return low
    if low in ("null", "none", "nil"):
        return "null"
    if _NUMBER.match(tok):
        if re.fullmatch(r"-?\d+", tok):
            return json.dumps(int(tok))
        f = float(tok)
        if math.isfinite(f):
            return json.dumps(f)
    return _dumps(tok)


class _Parser:
    def __init__(self, text: str, partial: bool):
        self.s = text
        self.i = 0
        self.partial = partial
        self.out: list[str] = []
        self.eof_closes = False

    def run(self) -> str:
        try:
            self._ws()
            if self.i >= len(self.s):
                self._more()
            if self.s[self.i] != "{":
                raise GemmaSyntaxError("arguments must start with '{'")
            self._obj()
            self._ws()
            if self.i < len(self.s):
                raise GemmaSyntaxError(f"unexpected text after the arguments at {self.i}")
        except _Incomplete:
            pass
        return "".join(self.out)

    # helpers ---------------------------------------------------------------------------------
    def _more(self):
        if self.partial:
            raise _Incomplete
        raise GemmaSyntaxError("unexpected end of arguments")

    def _ws(self):
        s, i = self.s, self.i
        while i < len(s) and s[i] in _WS:
            i += 1
        self.i = i

    def _eof_or_close(self, closer: str) -> bool:
        """At end of input: close the container if an unterminated string ended the text."""
        if self.i < len(self.s):
            return False
        if self.eof_closes:
            self.out.append(closer)
            return True
        self._more()
        return False

    # grammar ---------------------------------------------------------------------------------
    def _obj(self):
        keys: set[str] = set()

        def member(first: bool) -> None:
            key = self._key()
            if key in keys:
                raise GemmaSyntaxError(f"duplicate key {key!r}")
            self.out.append(("" if first else ", ") + _dumps(key) + ": ")
            keys.add(key)
            self._value(in_obj=True)
        self._items("{", "}", member)

    def _items(self, opener: str, closer: str, item) -> None:
        """`opener item (, item)* ,? closer` (an empty body and a trailing comma allowed); item(first)
        parses one member or element and writes its JSON."""
        self.out.append(opener)
        self.i += 1
        self._ws()
        if self._eof_or_close(closer):
            return
        first = True
        while True:
            if self.s[self.i] == closer:        # empty, or after a trailing comma
                self.i += 1
                self.out.append(closer)
                return
            item(first)
            first = False
            self._ws()
            if self._eof_or_close(closer):
                return
            c = self.s[self.i]
            if c == closer:
                self.i += 1
                self.out.append(closer)
                return
            if c != ",":
                raise GemmaSyntaxError(f"expected ',' or '{closer}' at {self.i}")
            self.i += 1
            self._ws()
            if self._eof_or_close(closer):
                return
            if self.s[self.i] == closer:        # trailing comma
                self.i += 1
                self.out.append(closer)
                return

    def _key(self) -> str:
        s, i = self.s, self.i
        if s.startswith(_D, i):
            j = s.find(_D, i + len(_D))
            if j < 0:
                self._more()
            key = s[i + len(_D):j]
            self.i = j + len(_D)
            self._ws()
            if self.i >= len(s):
                self._more()
            if s[self.i] != ":":
                raise GemmaSyntaxError(f"expected ':' after key at {self.i}")
            self.i += 1
            return key
        j = s.find(":", i)
        seg = s[i:] if j < 0 else s[i:j]
        if _KEY_FORBIDDEN.intersection(seg) or _D in seg:
            raise GemmaSyntaxError(f"bad key at {i}")
        if j < 0:
            self._more()
        key = seg.strip()
        if not key:
            raise GemmaSyntaxError(f"empty key at {i}")
        self.i = j + 1
        return key

    def _value(self, in_obj: bool):
        self._ws()
        s = self.s
        if self.i >= len(s):
            self._more()
        c = s[self.i]
        if s.startswith(_D, self.i):
            self._string()
        elif c == "{":
            self._obj()
        elif c == "[":
            self._arr()
        elif in_obj and c in ",}":
            self.out.append('""')               # `key:` with no value
        elif c in ",}]":
            raise GemmaSyntaxError(f"missing value at {self.i}")
        else:
            self._bare()

    def _string(self):
        s = self.s
        start = self.i + len(_D)
        j = s.find(_D, start)
        if j >= 0:
            self.out.append(_dumps(s[start:j]))
            self.i = j + len(_D)
            return
        rest = s[start:]
        if self.partial:
            for k in range(len(_D) - 1, 0, -1):     # a delimiter may be forming
                if rest.endswith(_D[:k]):
                    rest = rest[:-k]
                    break
            m = _CLOSE_TAIL.search(rest)            # could be the arguments' final brace
            if m:
                rest = rest[:m.start()]
            self.out.append(_dumps(rest)[:-1])
            raise _Incomplete
        m = _CLOSE_TAIL.search(rest)
        self.out.append(_dumps(rest[:m.start()] if m else rest))
        self.i = len(s)
        self.eof_closes = True

    def _bare(self):
        s = self.s
        m = _BARE_END.search(s, self.i)
        seg = s[self.i:] if m is None else s[self.i:m.start()]
        if "{" in seg or "[" in seg or _D in seg:
            raise GemmaSyntaxError(f"bad bare value at {self.i}")
        if m is None:
            self._more()
        self.out.append(_bare_json(seg.strip()))
        self.i = m.start()

    def _arr(self):
        def element(first: bool) -> None:
            if not first:
                self.out.append(", ")
            self._value(in_obj=False)
        self._items("[", "]", element)


def gemma_args_to_json(text: str) -> str:
    """`{...}` in Gemma syntax -> JSON text (json.dumps style). Raises GemmaSyntaxError."""
    return _Parser(text, partial=False).run()


def partial_gemma_args_json(text: str) -> str:
    """The stable JSON prefix of a possibly unfinished Gemma `{...}`: every completion of `text`
    yields JSON that starts with it. Raises GemmaSyntaxError once the text can no longer be valid."""
    return _Parser(text, partial=True).run()


def parse_gemma_args(text: str) -> dict[str, Any]:
    """`{...}` in Gemma syntax -> Python dict."""
    return json.loads(gemma_args_to_json(text))


# ----------------------------------------------------------------------------------------------
# Python -> Gemma syntax
# ----------------------------------------------------------------------------------------------

def _gemma_key(k: str) -> str:
    if not isinstance(k, str):
        raise TypeError(f"object keys must be str, got {type(k).__name__}")
    if _D in k:
        raise ValueError(f"key {k!r} contains {_D}")
    if not k or k != k.strip() or _KEY_FORBIDDEN.intersection(k) or ":" in k:
        return _D + k + _D
    return k


def to_gemma_value(v: Any, sort_keys: bool = False) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError("non-finite float")
        return json.dumps(v)
    if isinstance(v, str):
        if _D in v or "<tool_call|>" in v:
            raise ValueError(f"string {v!r} cannot be written in Gemma syntax")
        return _D + v + _D
    if isinstance(v, dict):
        items = sorted(v.items()) if sort_keys else v.items()
        return "{" + ",".join(_gemma_key(k) + ":" + to_gemma_value(x, sort_keys)
                              for k, x in items) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(to_gemma_value(x, sort_keys) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} in Gemma syntax")


def to_gemma_args(args: dict[str, Any], sort_keys: bool = False) -> str:
    """A dict -> Gemma `{k:v,...}` text, e.g. for `<|tool_call>call:NAME{...}<tool_call|>`."""
    if not isinstance(args, dict):
        raise TypeError("tool arguments must be a dict")
    return to_gemma_value(args, sort_keys)
