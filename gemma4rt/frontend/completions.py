"""POST /v1/completions (legacy text completions)."""
from __future__ import annotations

from aiohttp import web

from gemma4rt.frontend.common import (
    SSE, check_capacity, check_model, check_rids, client_gone, error_status, fan_in, first_then_rest, new_id, now,
    read_json, usage,
)
from gemma4rt.frontend.errors import bad_request
from gemma4rt.frontend.frontdoor import SeqOptions
from gemma4rt.frontend.structured import request_grammar
from gemma4rt.frontend.sampling import (
    MAX_N, REFUSED, build_sampling, check_token_ids, client_rid, field, refuse_unimplemented, stop_strings,
    stream_fields, with_seed,
)
from gemma4rt.protocol import AddRequest


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


async def prompts_to_ids(st, body: dict, name: str = "prompt") -> list[list[int]]:
    p = body.get(name)
    tok = st.tokenizer
    if isinstance(p, str):
        return [await tok.encode(p, add_bos=True)]
    if _is_ids(p):
        check_token_ids(p, st.model_info.vocab_size, name)
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return [await tok.encode(x, add_bos=True) for x in p]
    if isinstance(p, list) and p and all(_is_ids(x) for x in p):
        for x in p:
            check_token_ids(x, st.model_info.vocab_size, name)
        return p
    raise bad_request(f"'{name}' must be a string, a list of strings, a list of token ids or a list of "
                      f"token-id lists (non-empty).", param=name)


class _Choice:
    __slots__ = ("text", "tokens", "lps", "tops", "offsets", "fin", "matched", "n_out", "prompt_done", "score")

    def __init__(self):
        self.text = ""
        self.tokens, self.lps, self.tops, self.offsets = [], [], [], []
        self.fin = self.matched = None
        self.n_out = 0
        self.prompt_done = False
        self.score = 0.0            # sum of the generated tokens' log-probabilities (best_of)


async def completions(request: web.Request) -> web.StreamResponse:
    st = request.app["state"]
    fd = st.frontdoor
    body = await read_json(request)
    model = check_model(st, body)
    refuse_unimplemented(body, REFUSED)
    n = field(body, "n", "int", 1, lo=1, hi=MAX_N)
    best_of = field(body, "best_of", "int", None, lo=1, hi=MAX_N)
    stream, include_usage, continuous = stream_fields(body, st.force_include_usage)
    if best_of is not None and best_of < n:
        raise bad_request(f"'best_of' ({best_of}) must be at least 'n' ({n}).", param="best_of")
    if best_of is not None and best_of > n and stream:
        raise bad_request("'best_of' greater than 'n' cannot be streamed (the best are known at the end).",
                          param="best_of")
    if body.get("suffix") not in (None, ""):
        raise bad_request("'suffix' (insertion) is not supported by Gemma 4.", param="suffix")
    ranked = best_of is not None and best_of > n       # generate best_of per prompt, return the n most likely
    m = best_of if ranked else n
    echo = field(body, "echo", "bool", False)
    k = field(body, "logprobs", "int", None, lo=0, hi=20)
    max_tokens = field(body, "max_tokens", "int", 16, lo=1)
    stops = stop_strings(body)
    include_stop = field(body, "include_stop_str_in_output", "bool", False) or field(body, "no_stop_trim", "bool", False)
    skip_special = field(body, "skip_special_tokens", "bool", True)
    grammar = request_grammar(body)
    prompts = await prompts_to_ids(st, body)
    check_capacity(fd, m * len(prompts))
    adds, idx = [], []
    rid = client_rid(body) or fd.new_rid("cmpl")
    for pi, ids in enumerate(prompts):
        sp = build_sampling(body, body, st.model_info, len(ids), max_tokens, logprobs=k is not None or ranked,
                            top_logprobs=k or 0, prompt_logprobs=echo and k is not None, grammar=grammar)
        for i in range(m):
            adds.append(AddRequest(rid=f"{rid}-{pi}-{i}", prompt_token_ids=ids, sampling=with_seed(sp, i)))
            idx.append(pi)
    opts = [SeqOptions(stop=stops, include_stop=include_stop, skip_special_tokens=skip_special) for _ in adds]
    check_rids(fd, adds)
    cid = new_id("cmpl")
    created = now()
    tok = st.tokenizer
    gen = fan_in(fd, adds, opts, client_gone(request), rid)
    choices = [_Choice() for _ in adds]
    prompt_texts = {}
    if echo:
        for pi, ids in enumerate(prompts):
            prompt_texts[pi] = tok.decode(ids, skip_special_tokens=skip_special)

    def lp_view(c: _Choice, ch, start_offset: int):
        """Append this chunk's tokens to c's logprob lists; returns the new slice as a dict."""
        toks, lps, tops, offs = [], [], [], []
        if echo and not c.prompt_done and ch.prompt_logprobs is not None:
            ids = adds[choices.index(c)].prompt_token_ids
            off = 0
            for j, t in enumerate(ids):
                piece = tok.piece(t)
                toks.append(piece)
                lps.append(ch.prompt_logprobs[j] if j < len(ch.prompt_logprobs) else None)
                pt = ch.prompt_top_logprobs[j] if ch.prompt_top_logprobs and j < len(ch.prompt_top_logprobs) else None
                tops.append({tok.piece(a): b for a, b in pt} if pt else None)
                offs.append(off)
                if not (skip_special and t in tok.special_ids):    # the echoed text leaves it out (<bos>)
                    off += len(piece)
            c.prompt_done = True
        off = start_offset
        for j, t in enumerate(ch.token_ids):
            piece = tok.piece(t)
            toks.append(piece)
            lps.append(ch.logprobs[j] if ch.logprobs and j < len(ch.logprobs) else None)
            tops.append({tok.piece(a): b for a, b in ch.top_logprobs[j]} if ch.top_logprobs and j < len(ch.top_logprobs) else {})
            offs.append(off)
            off += len(piece)
        c.tokens += toks
        c.lps += lps
        c.tops += tops
        c.offsets += offs
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    if stream:
        chunks = await first_then_rest(fd, gen)
        sse = SSE(request)
        await sse.start()
        base = {"id": cid, "object": "text_completion", "created": created, "model": model}
        n_prompt = {}
        n_cached = {}
        try:
            async for i, ch in chunks:
                if ch.finish_reason == "error":
                    await sse.send(error_status(fd, ch).body())
                    break
                c = choices[i]
                text = ch.text
                ptext = prompt_texts.get(idx[i], "") if echo else ""
                lp = lp_view(c, ch, len(ptext) + len(c.text)) if k is not None else None
                if echo and not c.n_out and c.fin is None and c.matched is None:
                    text = ptext + text
                    c.matched = ""              # marks "prompt echoed" for this choice
                c.text += ch.text
                fin = ch.finish_reason
                c.n_out = ch.num_output_tokens
                n_prompt[idx[i]], n_cached[idx[i]] = ch.num_prompt_tokens, ch.num_cached_tokens
                if text or lp or fin:
                    out = dict(base, choices=[{"index": i, "text": text, "logprobs": lp, "finish_reason": fin,
                                               **({"matched_stop": ch.matched_stop} if fin else {})}])
                    if continuous:
                        out["usage"] = usage(sum(n_prompt.values()), sum(x.n_out for x in choices),
                                             sum(n_cached.values()))
                    await sse.send(out)
                if not sse.ok:
                    break
            if include_usage and sse.ok:
                await sse.send(dict(base, choices=[], usage=usage(sum(n_prompt.values()),
                                                                  sum(c.n_out for c in choices),
                                                                  sum(n_cached.values()))))
        finally:
            await gen.aclose()
        return await sse.done()

    n_prompt, n_cached = {}, {}
    async for i, ch in gen:
        if ch.finish_reason == "error":
            await gen.aclose()
            raise error_status(fd, ch)
        c = choices[i]
        if k is not None:
            lp_view(c, ch, (len(prompt_texts[idx[i]]) if echo else 0) + len(c.text))
        if ranked and ch.logprobs:
            c.score += sum(x for x in ch.logprobs if x is not None)
        c.text += ch.text
        if ch.finish_reason:
            c.fin, c.matched, c.n_out = ch.finish_reason, ch.matched_stop, ch.num_output_tokens
            n_prompt[idx[i]], n_cached[idx[i]] = ch.num_prompt_tokens, ch.num_cached_tokens
    keep = range(len(choices))
    if ranked:       # per prompt, its n candidates of highest total log-probability (usage counts them all)
        keep = [pi * m + j for pi in range(len(prompts))
                for j in sorted(range(m), key=lambda j: -choices[pi * m + j].score)[:n]]
    out = []
    for i in keep:
        c = choices[i]
        text = (prompt_texts[idx[i]] + c.text) if echo else c.text
        lp = None
        if k is not None:
            lp = {"tokens": c.tokens, "token_logprobs": c.lps, "top_logprobs": c.tops, "text_offset": c.offsets}
        out.append({"index": len(out), "text": text, "logprobs": lp, "finish_reason": c.fin,
                    "matched_stop": c.matched})
    return web.json_response({"id": cid, "object": "text_completion", "created": created, "model": model,
                              "choices": out, "usage": usage(sum(n_prompt.values()), sum(c.n_out for c in choices),
                                                             sum(n_cached.values()))})
