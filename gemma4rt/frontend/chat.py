"""POST /v1/chat/completions."""
from __future__ import annotations

import json
from typing import Optional

import msgspec
from aiohttp import web

from gemma4rt.frontend.common import (
    SSE, chat_logprobs, check_capacity, check_model, check_rids, client_gone, error_status, fan_in,
    first_then_rest, new_id, now, read_json, usage,
)
from gemma4rt.frontend.errors import bad_request
from gemma4rt.frontend.frontdoor import SeqOptions
from gemma4rt.frontend.media import MEDIA_PARTS, collect_parts
from gemma4rt.frontend.parsing import OutputParser
from gemma4rt.frontend.structured import after_reasoning, request_grammar, tool_choice_constraint
from gemma4rt.frontend.sampling import (
    CHAT_REFUSED, MAX_N, MAX_TOP_LOGPROBS, build_sampling, client_rid, field, refuse_unimplemented, stop_strings,
    stream_fields, with_seed,
)
from gemma4rt.protocol import AddRequest

ROLES = {"system", "developer", "user", "assistant", "tool", "function", "model"}


def _messages(body: dict) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("'messages' must be a non-empty list.", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"'messages[{i}]' must be an object.", param="messages")
        role = m.get("role")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise bad_request(f"'messages[{i}].role' must be one of {sorted(ROLES)}.", param="messages")
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for j, p in enumerate(c):
                if not isinstance(p, dict) or not isinstance(p.get("type"), str):
                    raise bad_request(f"'messages[{i}].content' parts must be objects with a 'type'.",
                                      param="messages")
                if p["type"] in ("text", "input_text"):          # input_text: the Responses API's name
                    if not isinstance(p.get("text"), str):
                        raise bad_request(f"'messages[{i}].content' text parts need a string 'text'.",
                                          param="messages")
                    p = {**p, "type": "text"}
                elif p["type"] not in MEDIA_PARTS:
                    raise bad_request(f"'messages[{i}].content[{j}].type' {p['type']!r} is not a content part "
                                      f"this server reads (text, image_url, input_audio, audio_url, video_url).",
                                      param="messages")
                parts.append(p)
            c = parts
        elif c is not None and not isinstance(c, str):
            raise bad_request(f"'messages[{i}].content' must be a string or a list of parts.", param="messages")
        if c is None and not (role.lower() in ("assistant", "model") and m.get("tool_calls")):
            raise bad_request(f"'messages[{i}].content' is required (an assistant message may have tool_calls "
                              f"instead).", param="messages")
        m = dict(m, content=c)
        m["role"] = role.lower()
        if m.get("tool_calls") is not None:
            m["tool_calls"] = _tool_calls(m["tool_calls"], i)
        if m["role"] == "tool" and isinstance(c, list):       # text parts -> one string
            m["content"] = "".join(p.get("text", "") for p in c if p.get("type") == "text")
        out.append(m)
    return out


def _reasoning_knobs(body: dict, kwargs: dict) -> None:
    """SGLang's `reasoning_effort` (or `reasoning: {"effort"|"enabled"}`) turns thinking on ("none":
    off) unless chat_template_kwargs.enable_thinking is set."""
    effort = body.get("reasoning_effort")
    r = body.get("reasoning")
    if effort is None and isinstance(r, dict):
        effort = r.get("effort")
        if effort is None and isinstance(r.get("enabled"), bool):
            effort = "medium" if r["enabled"] else "none"
    if effort is None:
        return
    if not isinstance(effort, str):
        raise bad_request("'reasoning_effort' must be a string (none, minimal, low, medium, high).",
                          param="reasoning_effort")
    kwargs.setdefault("enable_thinking", effort.lower() != "none")


def text_mode(skip_special: bool, parsers_on: bool, unparsed_tools: bool, unseparated_reasoning: bool,
              control_ids: frozenset) -> tuple[bool, frozenset]:
    """(skip_special_tokens, ids to drop) for the detokenizer. The output parsers read special tokens as
    text (the thought channel and tool-call tags); so does the client where the request asked for tags
    that no parser takes out (tools without --tool-call-parser, separate_reasoning false): the tags stay in
    the content, in Gemma's format, rather than being stripped around their contents. Either way control
    tokens such as the closing `<turn|>` are dropped, unless the request keeps special tokens."""
    tags = parsers_on or unparsed_tools or unseparated_reasoning
    if not skip_special:
        return False, frozenset()
    return (False, control_ids) if tags else (True, frozenset())


def _tool_calls(calls, i: int) -> list:
    """An assistant message's tool_calls with JSON-string arguments parsed to objects: chat templates
    render a dict as Gemma's call syntax but would paste a string verbatim."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise bad_request(f"'{where}' must be a list.", param="messages")
    out = []
    for j, tc in enumerate(calls):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"'{where}[{j}]' needs 'function' with a string 'name'.", param="messages")
        args = fn.get("arguments")
        if args is None or args == "":
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise bad_request(f"'{where}[{j}].function.arguments' is not valid JSON: {e}", param="messages")
        if not isinstance(args, dict):
            raise bad_request(f"'{where}[{j}].function.arguments' must be a JSON object.", param="messages")
        out.append({**tc, "function": {**fn, "arguments": args}})
    return out


async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = request.app["state"]
    fd = st.frontdoor
    body = await read_json(request)
    model = check_model(st, body)
    refuse_unimplemented(body, CHAT_REFUSED)
    messages = _messages(body)
    parts = collect_parts(messages)
    if parts and st.media is None:
        raise bad_request(f"{parts[0].where}: this model takes text only ({parts[0].modality} input is not "
                          f"supported).", param="messages")
    n = field(body, "n", "int", 1, lo=1, hi=MAX_N)
    stream, include_usage, continuous = stream_fields(body, st.force_include_usage)
    want_lp = field(body, "logprobs", "bool", False)
    top_lp = field(body, "top_logprobs", "int", 0, lo=0, hi=MAX_TOP_LOGPROBS)
    if top_lp and not want_lp:
        raise bad_request("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    max_tokens = field(body, "max_completion_tokens", "int", None, lo=1)
    if max_tokens is None:
        max_tokens = field(body, "max_tokens", "int", None, lo=1)
    tools, tool_grammar = tool_choice_constraint(body, field(body, "tools", "list", None))
    grammar = request_grammar(body)
    if grammar is not None and tool_grammar is not None:
        raise bad_request("'response_format' cannot be combined with tool_choice 'required' or a named tool.",
                          param="response_format")
    kwargs = {**st.chat_template_kwargs, **(field(body, "chat_template_kwargs", "dict", {}) or {})}
    _reasoning_knobs(body, kwargs)
    kwargs.setdefault("add_generation_prompt", field(body, "add_generation_prompt", "bool", True))
    if field(body, "continue_final_message", "bool", False):
        kwargs["continue_final_message"] = True
        kwargs["add_generation_prompt"] = False
    thinking = bool(kwargs.get("enable_thinking", False))
    stops = stop_strings(body)
    include_stop = field(body, "include_stop_str_in_output", "bool", False) or field(body, "no_stop_trim", "bool", False)
    skip_special = field(body, "skip_special_tokens", "bool", True)
    # a forced call (tool_choice required / named) is always parsed: its format is known
    tool_parse = bool(tools) and (st.parsers["tool"] or tool_grammar is not None)
    # separate_reasoning (SGLang) false: the thought stays in content, tags and all (text_mode)
    reasoning_parse = st.parsers["reasoning"] and field(body, "separate_reasoning", "bool", True)
    include_reasoning = field(body, "include_reasoning", "bool", True)      # vLLM: false drops it
    parsers_on = reasoning_parse or tool_parse
    check_capacity(fd, n)
    media = await st.media.load(parts) if parts else []
    prompt_text, prompt_ids = await st.tokenizer.render_chat(messages, tools, kwargs)
    mm_items = []
    if media:
        prompt_ids, mm_items = await st.media.expand(prompt_text, prompt_ids, media, parts,
                                                     lambda t: st.tokenizer.tok.encode(t, add_special_tokens=False))
    sp = build_sampling(body, body, st.model_info, len(prompt_ids), max_tokens,
                        logprobs=want_lp, top_logprobs=top_lp,
                        grammar=after_reasoning(grammar or tool_grammar, thinking, st.tokenizer))
    budget = field(body, "thinking_token_budget", "int", None, lo=0)      # vLLM's
    if budget is not None:
        if st.tokenizer.channel_ids is None:
            raise bad_request("'thinking_token_budget' needs a tokenizer with the thought-channel tokens.",
                              param="thinking_token_budget")
        sp = msgspec.structs.replace(sp, thinking_budget=budget, thinking_tokens=list(st.tokenizer.channel_ids))
    rid = client_rid(body) or fd.new_rid("chat")
    adds = [AddRequest(rid=rid if n == 1 else f"{rid}-{i}", prompt_token_ids=prompt_ids,
                       sampling=with_seed(sp, i), mm_items=mm_items) for i in range(n)]
    skip, drop = text_mode(skip_special, parsers_on, bool(tools) and not tool_parse,
                           st.parsers["reasoning"] and not reasoning_parse, st.tokenizer.control_ids)
    opts = [SeqOptions(stop=stops, include_stop=include_stop, skip_special_tokens=skip, drop_ids=drop)
            for _ in range(n)]
    parsers = [OutputParser(reasoning_parse, tool_parse, thinking, tools, include_reasoning, st.tokenizer.channel_ids)
               for _ in range(n)]
    check_rids(fd, adds)
    cid = new_id("chatcmpl")
    created = now()
    gen = fan_in(fd, adds, opts, client_gone(request), rid)
    if stream:
        return await _stream(request, st, gen, parsers, cid, created, model, n, (include_usage, continuous),
                             want_lp, len(prompt_ids))
    return await _whole(st, gen, parsers, cid, created, model, n, want_lp)


async def _whole(st, gen, parsers, cid, created, model, n, want_lp):
    fd = st.frontdoor
    texts = [""] * n
    lps = [[] for _ in range(n)]
    fins = [None] * n
    matched = [None] * n
    n_prompt = n_cached = 0
    n_out = [0] * n
    async for i, ch in gen:
        if ch.error and ch.finish_reason == "error":
            await gen.aclose()
            raise error_status(fd, ch)
        texts[i] += ch.text
        parsers[i].count(ch.token_ids)
        if want_lp:
            lps[i] += chat_logprobs(st.tokenizer, ch.token_ids, ch.logprobs, ch.top_logprobs)
        if ch.finish_reason:
            fins[i], matched[i] = ch.finish_reason, ch.matched_stop
            n_prompt, n_cached = ch.num_prompt_tokens, ch.num_cached_tokens
            n_out[i] = ch.num_output_tokens
    choices = []
    for i in range(n):
        msg = {"role": "assistant", "content": texts[i]}
        fin = fins[i]
        p = parsers[i]
        if p.active:
            r = p.feed(texts[i], final=True)
            calls = p.whole_tool_calls()
            msg["content"] = r.content if (r.content or not calls) else None
            if p.r is not None:         # the reasoning parser ran: the fields are there, null when empty
                msg["reasoning_content"] = msg["reasoning"] = r.reasoning or None
            if calls:
                msg["tool_calls"] = calls
                if fin == "stop":
                    fin = "tool_calls"
        choices.append({"index": i, "message": msg, "logprobs": {"content": lps[i]} if want_lp else None,
                        "finish_reason": fin, "matched_stop": matched[i]})
    return web.json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                              "choices": choices, "usage": usage(n_prompt, sum(n_out), n_cached,
                                                                 _reasoning_tokens(parsers))})


def _reasoning_tokens(parsers) -> Optional[int]:
    return sum(p.reasoning_tokens for p in parsers) if parsers[0].r is not None else None


async def _stream(request, st, gen, parsers, cid, created, model, n, usage_opts, want_lp, num_prompt=0):
    """usage_opts: (include_usage: a final usage chunk, continuous_usage_stats: running usage in every
    chunk, from the role chunk on, which counts the prompt's num_prompt tokens)."""
    include_usage, continuous = usage_opts
    fd = st.frontdoor
    chunks = await first_then_rest(fd, gen)
    sse = SSE(request)
    await sse.start()
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(i, delta, fin=None, lp=None, matched=None):
        c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": fin}
        if fin is not None:
            c["matched_stop"] = matched
        if continuous:
            return dict(base, choices=[c], usage=usage(n_prompt, sum(n_out), n_cached))
        return dict(base, choices=[c])

    n_prompt, n_cached = num_prompt, 0
    n_out = [0] * n
    for i in range(n):
        await sse.send(chunk(i, {"role": "assistant", "content": ""}))
    try:
        async for i, ch in chunks:
            if ch.finish_reason == "error":
                await sse.send(fd_error(fd, ch))
                break
            p = parsers[i]
            lp = {"content": chat_logprobs(st.tokenizer, ch.token_ids, ch.logprobs, ch.top_logprobs)} \
                if want_lp and ch.token_ids else None
            final = ch.finish_reason is not None
            p.count(ch.token_ids)
            n_prompt, n_cached = ch.num_prompt_tokens, ch.num_cached_tokens
            n_out[i] = ch.num_output_tokens
            deltas = []
            if p.active:
                r = p.feed(ch.text, final=final)
                if r.reasoning:
                    deltas.append({"reasoning_content": r.reasoning, "reasoning": r.reasoning})
                if r.content:
                    deltas.append({"content": r.content})
                if r.tool_calls:
                    deltas.append({"tool_calls": r.tool_calls})
            elif ch.text:
                deltas.append({"content": ch.text})
            if not deltas and lp is not None:
                deltas.append({"content": ""})
            for j, d in enumerate(deltas):
                await sse.send(chunk(i, d, lp=lp if j == 0 else None))
            if final:
                fin = ch.finish_reason
                if p.num_calls_ok and fin == "stop":
                    fin = "tool_calls"
                await sse.send(chunk(i, {}, fin=fin, matched=ch.matched_stop))
            if not sse.ok:
                break
        if include_usage and sse.ok:
            await sse.send(dict(base, choices=[], usage=usage(n_prompt, sum(n_out), n_cached,
                                                              _reasoning_tokens(parsers))))
    finally:
        await gen.aclose()
    return await sse.done()


def fd_error(fd, ch) -> dict:
    e = error_status(fd, ch)
    return e.body()
