"""Structured output: compile a GrammarSpec with xgrammar and mask logits with it.

GrammarBackend (one per worker) compiles and caches grammars by (kind, value); GrammarMatcher (one
per request) tracks the generated tokens and fills a token bitmask row; apply_bitmask() sets the
disallowed logits to -inf. Kinds:

- `json_schema`: strict JSON schema (no extra properties unless the schema allows them);
- `json_object`: any JSON object (OpenAI `response_format: json_object`);
- `regex`, `ebnf`: xgrammar regex / EBNF (GBNF-style) text;
- `tool_call`: Gemma's native call format. value = JSON
  `{"tools": [{"name": ..., "parameters": <schema>}], "parallel": bool}`; forces one (or, with
  parallel, one or more) `<|tool_call>call:NAME{...}<tool_call|>` for a listed NAME. The arguments
  grammar is generated from each tool's JSON schema in Gemma syntax (no whitespace): an object with
  `properties` allows exactly those keys, in declared order, each at most once, `required` ones
  present; property values follow `type` (string/integer/number/boolean/null/array with `items`/
  nested object) or a string `enum`. Anything else (no properties, anyOf/oneOf/$ref, patterns,
  bounds) falls back to a generic Gemma value, whose free-form objects can repeat a key (the parser
  then returns the call as content). Strings may not contain `<|` or `|>`, so no control token
  (`<|"|>`, `<tool_call|>`, ...) can appear inside one.

A token id at or beyond the tokenizer's vocabulary (the model's vocab may be padded) is always
disallowed while a grammar is active. `after_token_ids`: the grammar starts only after one of those
ids was accepted (e.g. `<channel|>`); before that every token is allowed.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional, Sequence

import torch
import xgrammar as xg

from gemma4rt.parsers.events import CHANNEL_END, CHANNEL_START, STRING_DELIM, TOOL_CALL_END, TOOL_CALL_START
from gemma4rt.protocol import GrammarSpec

SYMBOL_BASE = 0xF0000           # Supplementary Private Use Area-A: one character per added token
SYMBOL_COUNT = 0xFFFE
CONTROL_TAGS = (TOOL_CALL_START, TOOL_CALL_END, STRING_DELIM, CHANNEL_START, CHANNEL_END, "<|turn>", "<turn|>",
                "<|tool_response>", "<tool_response|>")

__all__ = ["GrammarError", "GrammarBackend", "GrammarMatcher", "apply_bitmask",
           "allocate_bitmask", "tool_call_ebnf"]


class GrammarError(ValueError):
    """The constraint cannot be compiled (bad schema / regex / grammar / tool list)."""


def _lit(s: str) -> str:
    """An EBNF string literal."""
    return json.dumps(s, ensure_ascii=False)


_GEMMA_VALUE_RULES = r'''
g_value ::= g_string | g_number | "true" | "false" | "null" | g_object | g_array
g_object ::= "{" (g_member ("," g_member)*)? "}"
g_member ::= g_key ":" g_value
g_key ::= [A-Za-z_] [A-Za-z0-9_]*
g_array ::= "[" (g_value ("," g_value)*)? "]"
g_string ::= "<|\"|>" g_s_n "<|\"|>"
g_s_n ::= "" | [^<|] g_s_n | "<" g_s_l | "|" g_s_p
g_s_l ::= "" | [^<|] g_s_n | "<" g_s_l
g_s_p ::= "" | [^<|>] g_s_n | "<" g_s_l | "|" g_s_p
g_number ::= g_int ("." [0-9]{1,17})?
g_int ::= "-"? ("0" | [1-9] [0-9]{0,18})
g_bool ::= "true" | "false"
'''


def tool_call_ebnf(tools: Sequence[dict[str, Any]], parallel: bool,
                   symbols: Optional[dict[str, str]] = None) -> str:
    """EBNF for Gemma's native tool-call format over the given tools (see module docstring).
    symbols (GrammarBackend.symbols): write the control tokens as their one-character symbols, and
    keep every symbol out of strings."""
    if not tools:
        raise GrammarError("tool_call grammar needs at least one tool")
    alts, rules = [], []
    for n, tool in enumerate(tools):
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not name or not all(
                c.isalnum() or c in "_-." for c in name):
            raise GrammarError(f"invalid tool name {name!r}")
        params = tool.get("parameters") or {}
        if not isinstance(params, dict):
            raise GrammarError(f"tool {name!r}: parameters must be a JSON schema object")
        body = _object_rules(f"a{n}", params, rules)
        rules.append(f't{n} ::= "<|tool_call>call:" {_lit(name)} {body} "<tool_call|>"')
        alts.append(f"t{n}")
    root = "root ::= call+" if parallel else "root ::= call"
    text = "\n".join([root, "call ::= " + " | ".join(alts)] + rules) + _GEMMA_VALUE_RULES
    if symbols:
        for tag in (TOOL_CALL_START, TOOL_CALL_END, STRING_DELIM):
            if tag in symbols:
                text = text.replace(_lit(tag)[1:-1], symbols[tag])
        lo, hi = chr(SYMBOL_BASE), chr(SYMBOL_BASE + SYMBOL_COUNT - 1)
        text = text.replace("[^<|]", f"[^<|{lo}-{hi}]").replace("[^<|>]", f"[^<|>{lo}-{hi}]")
    return text


def _value_rule(prefix: str, schema: Any, rules: list[str]) -> str:
    """Rule name for one property value: typed where the schema says so, else any Gemma value."""
    if not isinstance(schema, dict):
        return "g_value"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(e, str) and '<|"|>' not in e
                                               for e in enum):
        rules.append(f"{prefix} ::= " + " | ".join(_lit('<|"|>' + e + '<|"|>') for e in enum))
        return prefix
    t = schema.get("type")
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if t == "string" and isinstance(hi, int) and isinstance(lo, int) and 0 <= lo <= hi:
        rules.append(f'{prefix} ::= "<|\\"|>" [^<|]{{{lo},{hi}}} "<|\\"|>"')   # bounded: no < or |
        return prefix
    if t == "object":
        return _object_rules(prefix, schema, rules)
    if t == "array" and isinstance(schema.get("items"), dict):
        item = _value_rule(prefix + "_i", schema["items"], rules)
        rules.append(f'{prefix} ::= "[" ({item} ("," {item})*)? "]"')
        return prefix
    return {"string": "g_string", "integer": "g_int", "number": "g_number",
            "boolean": "g_bool", "null": '"null"', "array": "g_array"}.get(t, "g_value")


def _object_rules(prefix: str, schema: dict, rules: list[str]) -> str:
    """`{...}` over the schema's properties in declared order, each at most once, required ones
    present. Without properties: any Gemma object. Returns the rule name."""
    props = schema.get("properties") or {}
    if not isinstance(props, dict):
        raise GrammarError(f"{prefix}: properties must be an object")
    if not props:
        return "g_object"
    keys = list(props)
    req = set(schema.get("required") or []) & set(keys)
    members = []
    for j, k in enumerate(keys):
        key = _lit(k) if _simple_key(k) else _lit('<|"|>' + k + '<|"|>')
        members.append(f"{key} \":\" {_value_rule(f'{prefix}_p{j}', props[k], rules)}")
    n = len(keys)
    # f_i: the members from index i on when none was written yet; r_i: the same after >= 1 was written
    # (each then starts with a comma). Member i is written or, unless required, skipped: a chain of rules
    # linear in the number of properties (listing every later member in each rule made a schema of 2000
    # optional properties a grammar of millions of alternatives).
    for i in range(n + 1):
        for kind, comma in (("f", ""), ("r", '"," ')):
            if i == n:
                body = '""'
            else:
                alts = [f"{comma}{members[i]} {prefix}_r{i + 1}"]
                if keys[i] not in req:
                    alts.append(f"{prefix}_{kind}{i + 1}")
                body = " | ".join(f"({a})" for a in alts)
            rules.append(f"{prefix}_{kind}{i} ::= {body}")
    rules.append(f'{prefix} ::= "{{" {prefix}_f0 "}}"')
    return prefix


def _simple_key(k: str) -> bool:
    return bool(k) and (k[0].isalpha() or k[0] == "_") and all(c.isalnum() or c == "_" for c in k) \
        and k.isascii()


class GrammarBackend:
    """Compiles GrammarSpecs for one tokenizer. Thread-safe; compiled grammars are cached."""

    def __init__(self, tokenizer: Any, vocab_size: Optional[int] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, *, max_threads: int = 2,
                 vocab_type: xg.VocabType = xg.VocabType.BYTE_LEVEL):
        stops = list(stop_token_ids) if stop_token_ids else None
        self.symbols: dict[str, str] = {}     # added-token text -> its one-character symbol
        self.symbol_ids: list[int] = []
        if isinstance(tokenizer, (list, tuple)):
            self.tokenizer_info = xg.TokenizerInfo(list(tokenizer), vocab_type,
                                                   vocab_size=vocab_size, stop_token_ids=stops)
        else:
            self.tokenizer_info = xg.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
            self._symbolize(tokenizer)
        self.vocab_size = self.tokenizer_info.vocab_size
        self._compiler = xg.GrammarCompiler(self.tokenizer_info, max_threads=max_threads)
        self._cache: dict[tuple[str, str], xg.CompiledGrammar] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")

    def _symbolize(self, tokenizer: Any) -> None:
        """Give every added token (`<|tool_call>`, `<|"|>`, `<turn|>`, ...) a one-character text
        from Unicode's private-use plane 15 in the grammar's vocabulary. A grammar then writes
        `<|tool_call>` as that character, so only the real control token can match it, never the
        same text spelled by ordinary tokens (`<`, `|`, `to`, ...), which the model would not read
        as a call and which the server's parsers could not tell from it either."""
        info = self.tokenizer_info
        texts = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                 if 0 <= i < info.vocab_size}
        for tag in CONTROL_TAGS:             # control tokens that a tokenizer keeps in its base vocab
            i = tokenizer.convert_tokens_to_ids(tag)
            if isinstance(i, int) and 0 <= i < info.vocab_size and i != getattr(tokenizer, "unk_token_id", None):
                texts.setdefault(i, tag)
        added = sorted(texts)
        if not added or len(added) > SYMBOL_COUNT:
            return
        vocab = list(info.decoded_vocab)
        for k, i in enumerate(added):
            ch = chr(SYMBOL_BASE + k)
            self.symbols.setdefault(texts[i], ch)
            vocab[i] = ch.encode()
        self.symbol_ids = added
        self.tokenizer_info = xg.TokenizerInfo(vocab, xg.VocabType.RAW, vocab_size=info.vocab_size,
                                               stop_token_ids=list(info.stop_token_ids))

    def compile(self, spec: GrammarSpec) -> xg.CompiledGrammar:
        key = (spec.kind, spec.value)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        compiled = self._compile(spec.kind, spec.value)
        with self._lock:
            self._cache.setdefault(key, compiled)
        return compiled

    def compile_async(self, spec: GrammarSpec) -> "Future[xg.CompiledGrammar]":
        """Compile on a background thread; the future raises GrammarError on a bad spec."""
        return self._pool.submit(self.compile, spec)

    def matcher(self, spec: GrammarSpec, compiled: Optional[xg.CompiledGrammar] = None
                ) -> "GrammarMatcher":
        return GrammarMatcher(compiled if compiled is not None else self.compile(spec),
                              self.vocab_size, spec.after_token_ids, extra_words=self.kind_words(spec.kind))

    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        return allocate_bitmask(batch_size, self.vocab_size)

    def kind_words(self, kind: str) -> Optional[torch.Tensor]:
        """int32 [ceil(V/32)] ANDed into every mask of a grammar kind (None: nothing to add).

        - json_schema / json_object / regex / ebnf (free text): no added token except the stop
          tokens (a control token inside generated text would be dropped by the detokenizer);
          for JSON also no token whose text holds a control byte (< 0x20): xgrammar's
          length-bounded string rule admits raw control characters, which JSON forbids, and
          compact JSON (no free whitespace) never needs one;
        - tool_call: no ordinary token holding the byte 0xF3, so the symbols of the control tokens
          (U+F0000..) cannot be spelled byte by byte."""
        json_kind = kind in ("json_schema", "json_object")
        if kind not in ("json_schema", "json_object", "regex", "ebnf", "tool_call"):
            return None
        key = "json" if json_kind else kind if kind == "tool_call" else "text"
        cache = self.__dict__.setdefault("_kind_words", {})
        if key not in cache:
            import numpy as np
            W = (self.vocab_size + 31) // 32
            ok = np.zeros(W * 32, dtype=bool)
            ok[:self.vocab_size] = True
            vocab = self.tokenizer_info.decoded_vocab[:self.vocab_size]
            if key == "tool_call":
                for i, b in enumerate(vocab):
                    ok[i] = 0xF3 not in b
                ok[self.symbol_ids] = True
            else:
                if key == "json":
                    for i, b in enumerate(vocab):
                        ok[i] = not any(c < 0x20 for c in b)
                ok[self.symbol_ids] = False
                ok[list(self.tokenizer_info.stop_token_ids)] = True
            packed = np.packbits(ok.reshape(W, 32), axis=1, bitorder="little")   # [W, 4] uint8
            cache[key] = torch.from_numpy(packed.copy().view(np.int32).reshape(W))
        return cache[key]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)

    def _compile(self, kind: str, value: str) -> xg.CompiledGrammar:
        c = self._compiler
        try:
            if kind == "json_schema":
                try:
                    schema = json.loads(value)
                except json.JSONDecodeError as e:
                    raise GrammarError(f"json_schema is not valid JSON: {e}") from None
                if not isinstance(schema, (dict, bool)):
                    raise GrammarError("json_schema must be a JSON object")
                return c.compile_json_schema(json.dumps(schema), strict_mode=True,
                                             any_whitespace=False)
            if kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', strict_mode=False,
                                             any_whitespace=False)
            if kind == "regex":
                return c.compile_regex(value)
            if kind == "ebnf":
                return c.compile_grammar(value)
            if kind == "tool_call":
                try:
                    spec = json.loads(value)
                except json.JSONDecodeError as e:
                    raise GrammarError(f"tool_call spec is not valid JSON: {e}") from None
                if not isinstance(spec, dict) or not isinstance(spec.get("tools"), list):
                    raise GrammarError('tool_call spec must be {"tools": [...], "parallel": bool}')
                return c.compile_grammar(tool_call_ebnf(spec["tools"], bool(spec.get("parallel", False)),
                                                        self.symbols))
        except GrammarError:
            raise
        except Exception as e:      # xgrammar raises RuntimeError / InvalidJSONError etc.
            raise GrammarError(f"invalid {kind} constraint: {e}") from None
        raise GrammarError(f"unsupported grammar kind {kind!r}")


class GrammarMatcher:
    """Per-request grammar state over generated tokens (not the prompt)."""

    def __init__(self, compiled: xg.CompiledGrammar, vocab_size: int,
                 after_token_ids: Sequence[int] = (), max_rollback_tokens: int = -1,
                 extra_words: Optional[torch.Tensor] = None):
        self._extra = extra_words        # GrammarBackend.kind_words: ANDed into every mask
        self._m = xg.GrammarMatcher(compiled, max_rollback_tokens=max_rollback_tokens)
        self.vocab_size = vocab_size
        self._after = frozenset(after_token_ids)
        self._active = not self._after
        self._history: list[int] = []    # 0: before start, 1: the start token, 2: matcher token

    @property
    def active(self) -> bool:
        return self._active

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write row `row` of bitmask [B, ceil(V/32)] int32. Returns False (row set to all-allowed)
        when the grammar is not active yet, True otherwise."""
        if not self._active:
            bitmask[row].fill_(-1)
            return False
        self._m.fill_next_token_bitmask(bitmask, row)
        if self._extra is not None:
            bitmask[row] &= self._extra
        return True

    def accept(self, token_id: int) -> bool:
        """Advance by one generated token; False if the grammar forbids it (state unchanged)."""
        if not self._active:
            if token_id in self._after:
                self._active = True
                self._history.append(1)
            else:
                self._history.append(0)
            return True
        if token_id < 0 or token_id >= self.vocab_size or not self._m.accept_token(token_id):
            return False
        self._history.append(2)
        return True

    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens (speculative decoding)."""
        if n < 0 or n > len(self._history):
            raise ValueError(f"cannot roll back {n} of {len(self._history)} tokens")
        k = 0
        for _ in range(n):
            h = self._history.pop()
            if h == 2:
                k += 1
            elif h == 1:
                self._active = False
        if k:
            self._m.rollback(k)

    def is_terminated(self) -> bool:
        return self._active and self._m.is_terminated()

    def reset(self) -> None:
        self._m.reset()
        self._history.clear()
        self._active = not self._after


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """int32 [batch_size, ceil(vocab_size / 32)] on the CPU, all allowed."""
    return xg.allocate_token_bitmask(batch_size, vocab_size)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """In place: logits[r, t] = -inf where bit t of bitmask[r] is 0, for each r in rows.

    logits: [N, V] float; bitmask: [N, ceil(V'/32)] int32 (V' >= V is fine; ids >= 32 * width are
    disallowed). Pure torch; works on any device."""
    if len(rows) == 0:
        return
    dev = logits.device
    shifts = _SHIFTS.get(dev)
    if shifts is None:
        shifts = _SHIFTS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=dev)
    words = bitmask.to(dev, non_blocking=True).index_select(0, idx)        # [k, W]
    bits = (words.unsqueeze(-1) >> shifts) & 1                               # [k, W, 32]
    allowed = bits.reshape(len(rows), -1).bool()                            # [k, 32W]
    V = logits.shape[1]
    if allowed.shape[1] >= V:
        allowed = allowed[:, :V]
    else:
        pad = torch.zeros(len(rows), V - allowed.shape[1], dtype=torch.bool, device=dev)
        allowed = torch.cat([allowed, pad], dim=1)
    sub = logits.index_select(0, idx)
    sub.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, idx, sub)
