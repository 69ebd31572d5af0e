"""SGLang-native and utility routes: /generate, /v1/tokenize, /v1/detokenize, /abort_request,
/flush_cache, /health, /health_generate, /v1/models, /metrics, /get_load."""
from __future__ import annotations

import asyncio
import json

from aiohttp import web

from gemma4rt.frontend.common import (
    SSE, check_capacity, check_rids, client_gone, error_status, fan_in, first_then_rest, now, read_json,
)
from gemma4rt.frontend.completions import prompts_to_ids
from gemma4rt.frontend.errors import APIError, bad_request
from gemma4rt.frontend.frontdoor import SeqOptions
from gemma4rt.frontend.structured import from_extras
from gemma4rt.frontend.sampling import (
    REFUSED, SAMPLING_PARAMS_REFUSED, build_sampling, client_rid, field, refuse_unimplemented, stop_strings,
)
from gemma4rt.protocol import AddRequest, SamplingParams


GENERATE_REFUSED = {
    **REFUSED,
    **{k: (lambda v: v is not None, "send images and audio through /v1/chat/completions")
       for k in ("image_data", "audio_data", "video_data")},
    "logprob_start_len": (lambda v: v is not None and v != -1,
                          "input logprobs are returned by /v1/completions with 'echo' and 'logprobs'"),
}


async def generate(request: web.Request) -> web.StreamResponse:
    st = request.app["state"]
    fd = st.frontdoor
    body = await read_json(request)
    if body.get("input_ids") is not None:
        if not isinstance(body["input_ids"], list):
            raise bad_request("'input_ids' must be a list of token ids or a list of token-id lists.",
                              param="input_ids")
        prompts = await prompts_to_ids(st, body, "input_ids")
        single = not isinstance(body["input_ids"][0], list)
    elif body.get("text") is not None:
        prompts = await prompts_to_ids(st, body, "text")
        single = isinstance(body["text"], str)
    else:
        raise bad_request("Either 'text' or 'input_ids' is required.", param="text")
    spd = field(body, "sampling_params", "dict", {}) or {}
    refuse_unimplemented(body, GENERATE_REFUSED)
    stream = field(body, "stream", "bool", False)
    max_new = field(spd, "max_new_tokens", "int", 128, lo=0)
    if max_new == 0:
        raise bad_request("'sampling_params.max_new_tokens' 0 (prompt only, for input logprobs) is not implemented "
                          "on /generate; use /v1/completions with 'echo' and 'logprobs'.", param="max_new_tokens")
    want_lp = field(body, "return_logprob", "bool", False)
    top_n = field(body, "top_logprobs_num", "int", 0, lo=0, hi=20)
    lp_text = field(body, "return_text_in_logprobs", "bool", False)
    grammar = from_extras(spd)
    refuse_unimplemented(spd, SAMPLING_PARAMS_REFUSED, "sampling_params.")
    if field(spd, "n", "int", 1, lo=1) != 1:
        raise bad_request("'sampling_params.n' above 1 is not implemented on /generate; use /v1/completions or "
                          "/v1/chat/completions (their 'n'), or send the prompt several times.", param="n")
    check_capacity(fd, len(prompts))
    adds, opts = [], []
    base_rid = client_rid(body) or fd.new_rid("gen")
    for pi, ids in enumerate(prompts):
        sp = build_sampling(body, spd, st.model_info, len(ids), max_new, logprobs=want_lp,
                            top_logprobs=top_n if want_lp else 0, grammar=grammar)
        adds.append(AddRequest(rid=base_rid if single else f"{base_rid}-{pi}", prompt_token_ids=ids, sampling=sp))
        opts.append(SeqOptions(stop=stop_strings(spd), include_stop=field(spd, "no_stop_trim", "bool", False),
                               skip_special_tokens=field(spd, "skip_special_tokens", "bool", True)))
    check_rids(fd, adds)
    gen = fan_in(fd, adds, opts, client_gone(request), base_rid)
    texts = [""] * len(adds)
    ids_out = [[] for _ in adds]
    lps = [[] for _ in adds]
    tops = [[] for _ in adds]

    def text_of(t):
        return st.tokenizer.piece(t) if lp_text else None

    def result(i, ch, fin):
        meta = {"id": adds[i].rid, "finish_reason": ({"type": fin, "matched": ch.matched_stop} if fin else None),
                "prompt_tokens": ch.num_prompt_tokens or len(adds[i].prompt_token_ids),
                "completion_tokens": ch.num_output_tokens, "cached_tokens": ch.num_cached_tokens}
        if want_lp:      # SGLang's layout: [logprob, token id, text or None]
            meta["output_token_logprobs"] = [[lp, t, text_of(t)] for lp, t in zip(lps[i], ids_out[i])]
            if top_n:
                meta["output_top_logprobs"] = [[[b, a, text_of(a)] for a, b in (top or [])] for top in tops[i]]
        return {"text": texts[i], "output_ids": ids_out[i], "meta_info": meta}

    def take(i, ch):
        texts[i] += ch.text
        ids_out[i] += ch.token_ids
        lps[i] += ch.logprobs or []
        if top_n:
            tops[i] += ch.top_logprobs or [None] * len(ch.token_ids)

    if stream:
        chunks = await first_then_rest(fd, gen)          # an early error is a plain HTTP error
        sse = SSE(request)
        await sse.start()
        try:
            async for i, ch in chunks:
                if ch.finish_reason == "error":
                    await sse.send(error_status(fd, ch).body())
                    break
                take(i, ch)
                if not await sse.send(result(i, ch, ch.finish_reason)):
                    break
        finally:
            await gen.aclose()
        return await sse.done()
    res = [None] * len(adds)
    async for i, ch in gen:
        if ch.finish_reason == "error":
            await gen.aclose()
            raise error_status(fd, ch)
        take(i, ch)
        if ch.finish_reason:
            res[i] = result(i, ch, ch.finish_reason)
    return web.json_response(res[0] if single else res)


async def tokenize(request: web.Request) -> web.Response:
    st = request.app["state"]
    body = await read_json(request)
    if body.get("messages") is not None:
        from gemma4rt.frontend.chat import _messages
        kwargs = dict(field(body, "chat_template_kwargs", "dict", {}) or {})
        kwargs.setdefault("add_generation_prompt", field(body, "add_generation_prompt", "bool", True))
        _, ids = await st.tokenizer.render_chat(_messages(body), field(body, "tools", "list", None), kwargs)
    else:
        p = body.get("prompt")
        if not isinstance(p, str):
            raise bad_request("'prompt' (a string) or 'messages' is required.", param="prompt")
        ids = await st.tokenizer.encode(p, add_bos=field(body, "add_special_tokens", "bool", True))
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": st.model_info.context_length})


async def detokenize(request: web.Request) -> web.Response:
    st = request.app["state"]
    body = await read_json(request)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad_request("'tokens' must be a list of token ids.", param="tokens")
    if any(not 0 <= t < st.model_info.vocab_size for t in ids):
        raise bad_request("'tokens' holds an id outside the vocabulary.", param="tokens")
    return web.json_response({"prompt": st.tokenizer.decode(ids, skip_special_tokens=False)})


async def abort_request(request: web.Request) -> web.Response:
    st = request.app["state"]
    body = await read_json(request)
    if field(body, "abort_all", "bool", False):
        return web.json_response({"aborted": st.frontdoor.abort_all()})
    rid = body.get("rid")
    if not isinstance(rid, str):
        raise bad_request("'rid' (a string) or 'abort_all' is required.", param="rid")
    fd = st.frontdoor
    # the request of that id, or its sequences (n > 1, several prompts); never other requests whose ids
    # merely start with it
    hit = [rid] if rid in fd.queues else [r for r in fd.groups.get(rid, ()) if r in fd.queues]
    for r in hit:
        fd.abort_external(r)
    return web.json_response({"aborted": len(hit)})


async def flush_cache(request: web.Request) -> web.Response:
    request.app["state"].frontdoor.flush_cache()
    return web.json_response({"success": True, "message": "Cache flushed."})


async def health(request: web.Request) -> web.Response:
    fd = request.app["state"].frontdoor
    if not fd.healthy:
        return web.Response(status=503, text="engine is not running" if fd.engine_dead else "shutting down")
    return web.Response(status=200, text="")


async def health_generate(request: web.Request) -> web.Response:
    st = request.app["state"]
    fd = st.frontdoor
    if not fd.healthy:
        return web.Response(status=503)
    add = AddRequest(rid=fd.new_rid("health"), prompt_token_ids=[st.model_info.bos_token_id],
                     sampling=SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))

    async def one():
        async for ch in fd.generate(add, SeqOptions()):
            if ch.finish_reason:
                return ch.finish_reason != "error"
    try:
        ok = await asyncio.wait_for(one(), 20.0)
    except asyncio.TimeoutError:
        ok = False
    return web.Response(status=200 if ok else 503)


def _card(st, name: str) -> dict:
    return {"id": name, "object": "model", "created": st.created, "owned_by": "gemma4rt",
            "root": st.model_info.model_path or name, "max_model_len": st.model_info.context_length}


async def models(request: web.Request) -> web.Response:
    st = request.app["state"]
    return web.json_response({"object": "list", "data": [_card(st, st.served_name)]})


async def model_card(request: web.Request) -> web.Response:
    st = request.app["state"]
    name = request.match_info["model"]
    if name not in st.model_names:
        raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    return web.json_response(_card(st, name))


async def metrics(request: web.Request) -> web.Response:
    st = request.app["state"]
    if st.metrics is None:
        raise APIError(404, "Metrics are off; start the server with --enable-metrics.")
    return web.Response(body=st.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


async def get_load(request: web.Request) -> web.Response:
    st = request.app["state"]
    s = st.frontdoor.stats
    d = {"num_open_requests": st.frontdoor.num_open(), "healthy": st.frontdoor.healthy}
    if s is not None:
        d.update(num_running=s.num_running, num_waiting=s.num_waiting, pool_usage=s.pool_usage,
                 pool_pages=s.pool_pages, prefix_hit_tokens=s.prefix_hit_tokens,
                 prefix_query_tokens=s.prefix_query_tokens, num_preemptions=s.num_preemptions)
        if s.spec_verifications:
            # SGLang's figure: tokens per verification (the accepted drafts and the target's own token)
            d.update(spec_verifications=s.spec_verifications, spec_accepted=s.spec_accepted,
                     avg_spec_accept_length=1 + s.spec_accepted / s.spec_verifications)
    return web.json_response(d)


async def server_info(request: web.Request) -> web.Response:
    """SGLang's /get_server_info: the settings the server runs with (the API key redacted), its version, and
    the scheduler's state as in /get_load."""
    from gemma4rt import __version__
    st = request.app["state"]
    load = json.loads((await get_load(request)).body)
    return web.json_response(dict(st.server_args, version=__version__, internal_states=[load]), dumps=json.dumps)


async def version(request: web.Request) -> web.Response:
    from gemma4rt import __version__
    return web.json_response({"version": __version__})


async def model_info(request: web.Request) -> web.Response:
    st = request.app["state"]
    return web.json_response({"model_path": st.model_info.model_path, "served_model_name": st.served_name,
                              "is_generation": True, "context_length": st.model_info.context_length,
                              "created": now()}, dumps=json.dumps)
