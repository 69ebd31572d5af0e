"""Constraints a request asks for, turned into a GrammarSpec for the worker's sampler.

- chat/completions `response_format`: `text` (none), `json_object`, `json_schema` (strict);
- SGLang's request extras (also inside /generate's sampling_params): `json_schema` (a schema or its
  JSON text), `regex`, `ebnf`;
- vLLM's `structured_outputs` object (`json`, `regex`, `choice`, `grammar`, `json_object`) and its older
  `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` fields (a `choice` list becomes a
  regex of the escaped alternatives; `structural_tag` is a 400: not implemented);
- chat `tool_choice`: `required` or a named function force Gemma's native call syntax
  (`<|tool_call>call:NAME{...}<tool_call|>`, worker/grammar.tool_call_ebnf) for the request's tools,
  one call, or one or more with `parallel_tool_calls` (the default); `auto` leaves the model free;
  `none` renders no tools and parses none.

Every constraint is checked here, without the tokenizer (xgrammar's grammar front end is cheap), so a
bad schema, regex or grammar is a 400 before anything is queued. With thinking on, the constraint
starts after the thought channel ends (`<channel|>`), so the model still thinks freely.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from gemma4rt.frontend.errors import bad_request
from gemma4rt.protocol import GrammarSpec



def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:       # pragma: no cover - xgrammar is a dependency
        raise bad_request(f"Structured output is unavailable on this server (xgrammar: {e}).")
    return xgrammar


def _check(kind: str, value: str, param: str) -> None:
    xg = _xgrammar()
    try:
        if kind == "json_schema":
            xg.Grammar.from_json_schema(value, strict_mode=True, any_whitespace=False)
        elif kind == "regex":
            xg.Grammar.from_regex(value)
        elif kind == "ebnf":
            xg.Grammar.from_ebnf(value)
        elif kind == "tool_call":
            from gemma4rt.worker.grammar import tool_call_ebnf
            spec = json.loads(value)
            xg.Grammar.from_ebnf(tool_call_ebnf(spec["tools"], spec["parallel"]))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise bad_request(f"Invalid {param}: {msg}", param=param)


def _schema_text(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise bad_request(f"'{param}' is not valid JSON: {e}", param=param)
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"'{param}' must be a JSON schema object.", param=param)
    return json.dumps(schema)


def from_response_format(body: dict) -> Optional[GrammarSpec]:
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad_request("'response_format' must be an object with a 'type'.", param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec(kind="json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema'.",
                              param="response_format")
        schema = js.get("schema", js.get("schema_"))
        if schema is None:
            raise bad_request("'response_format.json_schema.schema' is required.", param="response_format")
        value = _schema_text(schema, "response_format.json_schema.schema")
        _check("json_schema", value, "response_format.json_schema.schema")
        return GrammarSpec(kind="json_schema", value=value)
    raise bad_request(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
                      param="response_format")


def from_extras(src: dict) -> Optional[GrammarSpec]:
    """SGLang's `json_schema` / `regex` / `ebnf` fields (at most one)."""
    given = [k for k in ("json_schema", "regex", "ebnf") if src.get(k) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"Only one of json_schema, regex and ebnf may be given, got {given}.", param=given[1])
    k = given[0]
    if k == "json_schema":
        value = _schema_text(src[k], k)
    elif isinstance(src[k], str):
        value = src[k]
    else:
        raise bad_request(f"'{k}' must be a string.", param=k)
    _check(k, value, k)
    return GrammarSpec(kind=k, value=value)


_REGEX_SPECIAL = set("\\.^$|?*+()[]{}")


def _choice_regex(choices: Any, param: str) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise bad_request(f"'{param}' must be a non-empty list of strings.", param=param)
    return "(" + "|".join("".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in c) for c in choices) + ")"


def from_vllm(body: dict) -> Optional[GrammarSpec]:
    """vLLM's `structured_outputs` {json | regex | choice | grammar | json_object} or its older `guided_*`
    fields (at most one constraint)."""
    so = body.get("structured_outputs")
    if so is not None and not isinstance(so, dict):
        raise bad_request("'structured_outputs' must be an object.", param="structured_outputs")
    given: list[tuple[str, str, Any]] = []          # (kind, param, value)
    for key, kind in (("json", "json_schema"), ("regex", "regex"), ("choice", "choice"), ("grammar", "ebnf"),
                      ("json_object", "json_object"), ("structural_tag", "structural_tag")):
        if so is not None and so.get(key) not in (None, False):
            given.append((kind, f"structured_outputs.{key}", so[key]))
        if key in ("json", "regex", "choice", "grammar") and body.get(f"guided_{key}") is not None:
            given.append((kind, f"guided_{key}", body[f"guided_{key}"]))
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"Only one structured-output constraint may be given, got {[g[1] for g in given]}.",
                          param=given[1][1])
    kind, param, value = given[0]
    if kind == "structural_tag":
        raise bad_request(f"'{param}' is not implemented by this server.", param=param)
    if kind == "json_object":
        return GrammarSpec(kind="json_object")
    if kind == "json_schema":
        value = _schema_text(value, param)
    elif kind == "choice":
        kind, value = "regex", _choice_regex(value, param)
    elif not isinstance(value, str):
        raise bad_request(f"'{param}' must be a string.", param=param)
    _check(kind, value, param)
    return GrammarSpec(kind=kind, value=value)


def request_grammar(body: dict) -> Optional[GrammarSpec]:
    given = [(name, g) for name, g in (("response_format", from_response_format(body)),
                                       ("json_schema/regex/ebnf", from_extras(body)),
                                       ("structured_outputs/guided_*", from_vllm(body))) if g is not None]
    if len(given) > 1:
        raise bad_request(f"Give one structured-output constraint, not several: {[n for n, _ in given]}.",
                          param="response_format")
    return given[0][1] if given else None


def check_tools(tools: Optional[list]) -> None:
    if tools is None:
        return
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"'tools[{i}]' needs 'function' with a non-empty string 'name'.", param="tools")
        if t.get("type", "function") != "function":
            raise bad_request(f"'tools[{i}].type' must be 'function'.", param="tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request(f"'tools[{i}].function.parameters' must be a JSON schema object.", param="tools")


def tool_choice_constraint(body: dict, tools: Optional[list]) -> tuple[Optional[list], Optional[GrammarSpec]]:
    """(tools to render and parse, forcing grammar or None) for the request's tool_choice."""
    check_tools(tools)
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls")
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return None, None
    if choice == "required":
        if not tools:
            raise bad_request("Tools cannot be empty if tool choice is set to required.", param="tool_choice")
        chosen = tools
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
        chosen = [t for t in (tools or []) if t["function"]["name"] == name]
        if not chosen:
            raise bad_request(f"Tool '{name}' not found in tools list.", param="tool_choice")
        parallel = False
    else:
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or "
                          "{'type': 'function', 'function': {'name': ...}}.", param="tool_choice")
    value = json.dumps({"tools": [{"name": t["function"]["name"],
                                   "parameters": t["function"].get("parameters") or {}} for t in chosen],
                        "parallel": parallel})
    _check("tool_call", value, "tools")
    return chosen, GrammarSpec(kind="tool_call", value=value)


def after_reasoning(spec: Optional[GrammarSpec], thinking: bool, tokenizer) -> Optional[GrammarSpec]:
    """With thinking on, start the constraint once the thought channel has ended."""
    if spec is None or not thinking:
        return spec
    if tokenizer.channel_ids is None:
        return spec
    return GrammarSpec(kind=spec.kind, value=spec.value, after_token_ids=[int(tokenizer.channel_ids[1])])
