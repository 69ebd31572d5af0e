"""Helpers shared by the routes: JSON bodies, model-name check, choice fan-in, SSE, logprob views."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import uuid

import msgspec
from typing import AsyncIterator, Callable, Optional

from aiohttp import web

from gemma4rt.frontend.errors import APIError, bad_request
from gemma4rt.frontend.frontdoor import SeqChunk, SeqOptions
from gemma4rt.protocol import AddRequest

_encode = msgspec.json.encode
_SURROGATE = re.compile(rb"\\[uU][dD][89a-fA-F]|\xed[\xa0-\xbf]")   # \ud800-\udfff, or its UTF-8 form
GONE_CHECK_S = 0.5            # how often a long wait checks whether the client is still there


async def read_json(request: web.Request) -> dict:
    ctype = request.content_type or ""
    if ctype != "application/json":
        raise bad_request("Unsupported Media Type: Only 'application/json' is allowed")
    raw = await request.read()        # raises 413 past client_max_size
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}")
    except RecursionError:
        raise bad_request("The request body nests JSON arrays or objects too deeply.")
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    # an escaped or encoded UTF-16 surrogate must be one of a pair (find() first: a large body of base64
    # media holds neither a backslash-u nor the byte 0xED, and the regex would scan it all)
    if (b"\\u" in raw or b"\xed" in raw) and _SURROGATE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("The request body holds an unpaired UTF-16 surrogate (e.g. '\\ud800'): "
                              "text must be valid Unicode.")
    return body


def check_model(state, body: dict) -> str:
    """The name to echo in the response. One model is served, so any name selects it (as SGLang does:
    clients and test suites send the hub id, "default", or names of their own)."""
    name = body.get("model")
    if name is None:
        return state.served_name
    if not isinstance(name, str):
        raise bad_request("'model' must be a string.", param="model")
    return name


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def check_rids(fd, adds) -> None:
    """A client-chosen request id ("rid") that a running request holds is a 400 (it would take over that
    request's output queue)."""
    for a in adds:
        fd.check_rid_free(a.rid)


def check_capacity(fd, n: int) -> None:
    if not fd.healthy:
        raise APIError(503, "The server is shutting down or the engine is not running.")
    if fd.queue_full(n):
        raise APIError(429, "Too many requests are waiting; retry later.", headers={"Retry-After": "1"})


async def fan_in(fd, adds: list[AddRequest], opts: list[SeqOptions], is_gone: Callable[[], bool],
                 group: Optional[str] = None) -> AsyncIterator[tuple[int, SeqChunk]]:
    """Run several sequences together and yield (index, chunk) as they come. Leaving early (client
    gone, error, cancellation) aborts every unfinished sequence. group: the request's id when its
    sequences have ids of their own (n > 1, several prompts), under which /abort_request finds them."""
    q: asyncio.Queue = asyncio.Queue()
    members = tuple(a.rid for a in adds)
    if group is not None and members != (group,):
        fd.groups[group] = members

    async def one(i: int, add: AddRequest, o: SeqOptions):
        try:
            async for ch in fd.generate(add, o):
                q.put_nowait((i, ch))
        except APIError as e:            # e.g. a request id taken between check_rids() and the submit
            q.put_nowait((i, SeqChunk(text="", token_ids=[], finish_reason="error", error=e.message,
                                      client_error=e)))
        except Exception as e:           # pragma: no cover (defensive)
            q.put_nowait((i, SeqChunk(text="", token_ids=[], finish_reason="error", error=str(e))))

    tasks = [asyncio.ensure_future(one(i, a, o)) for i, (a, o) in enumerate(zip(adds, opts))]
    left = len(tasks)
    loop = asyncio.get_running_loop()
    next_check = loop.time() + GONE_CHECK_S
    try:
        while left:
            try:
                i, ch = q.get_nowait() if q.qsize() else await asyncio.wait_for(q.get(), GONE_CHECK_S)
            except asyncio.TimeoutError:
                i = None
            if loop.time() >= next_check:
                next_check = loop.time() + GONE_CHECK_S
                if is_gone():
                    return
            if i is None:
                continue
            if ch.finish_reason is not None:
                left -= 1
            yield i, ch
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        if group is not None and fd.groups.get(group) == members:
            del fd.groups[group]


async def first_then_rest(fd, gen):
    """Pull the first chunk before the caller answers 200, so that an early error is a plain HTTP
    error (raised as APIError). Returns an iterator over that chunk and the rest."""
    first = await gen.__anext__()
    if first[1].finish_reason == "error":
        await gen.aclose()
        raise error_status(fd, first[1])

    async def chunks():
        yield first
        async for x in gen:
            yield x
    return chunks()


def client_gone(request: web.Request) -> Callable[[], bool]:
    """A check for a vanished client. aiohttp may not read the socket while a handler runs, so a
    client's FIN can go unnoticed: peek at the socket (on a dup of its fd) for EOF."""
    def f() -> bool:
        t = request.transport
        if t is None or t.is_closing():
            return True
        sk = t.get_extra_info("socket")
        if sk is None:
            return False
        try:
            with socket.fromfd(sk.fileno(), sk.family, sk.type) as dup:
                return dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
    return f


def error_status(fd, ch: SeqChunk) -> APIError:
    """A sequence that ended with an error, as the HTTP error to answer."""
    if ch.client_error is not None:
        return ch.client_error
    if fd.engine_dead is not None:
        return APIError(503, ch.error or "The engine stopped.")
    if ch.num_output_tokens == 0 and ch.error and ("context length" in ch.error or "KV cache" in ch.error
                                                   or "prompt" in ch.error.lower()):
        return bad_request(ch.error)
    return APIError(500, f"Internal server error: {ch.error}")


class SSE:
    """A text/event-stream response; write() returns False once the client is gone."""

    def __init__(self, request: web.Request):
        self.request = request
        self.resp = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        self.ok = True

    async def start(self) -> None:
        await self.resp.prepare(self.request)

    async def send(self, obj) -> bool:
        data = obj.encode() if isinstance(obj, str) else _encode(obj)
        try:
            await self.resp.write(b"data: " + data + b"\n\n")
        except (ConnectionResetError, ConnectionError, RuntimeError):
            self.ok = False
        return self.ok

    async def done(self) -> web.StreamResponse:
        if self.ok:
            await self.send("[DONE]")
            try:
                await self.resp.write_eof()
            except (ConnectionResetError, ConnectionError, RuntimeError):
                pass
        return self.resp


def chat_logprobs(tok, ids: list[int], lps: Optional[list], tops: Optional[list]) -> list[dict]:
    out = []
    for j, t in enumerate(ids):
        if lps is None or j >= len(lps):
            break
        entry = {"token": tok.piece(t), "bytes": tok.piece_bytes(t), "logprob": lps[j], "top_logprobs": []}
        if tops is not None and j < len(tops) and tops[j]:
            entry["top_logprobs"] = [{"token": tok.piece(a), "bytes": tok.piece_bytes(a), "logprob": b}
                                     for a, b in tops[j]]
        out.append(entry)
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached: int, reasoning: Optional[int] = None) -> dict:
    """OpenAI usage; with `reasoning`, the thought's tokens as OpenAI (completion_tokens_details) and
    SGLang (reasoning_tokens) report them."""
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}
    if reasoning is not None:
        u["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        u["reasoning_tokens"] = reasoning
    return u
