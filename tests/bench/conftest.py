"""Fixtures for the bench tests: the repo root on sys.path, and a tiny aiohttp server speaking
just enough of /generate and the OpenAI streaming routes for
bench/serving.py tests (it never runs a model). It records every request body it gets."""
from __future__ import annotations

import asyncio
import json
import threading

import os
import sys

import pytest
from aiohttp import web

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:            # `bench` is a folder of the repo, not an installed package
    sys.path.insert(0, ROOT)


class Stub:
    FIRST_DELAY = 0.03     # before the first generated token
    STEP_DELAY = 0.004     # between chunks

    def __init__(self, usage: bool = True, fail: bool = False, empty_text: bool = False,
                 accept_length: float = None):
        self.accept_length = accept_length          # set: /get_server_info reports it (speculative decoding)
        self.bodies: dict[str, list[dict]] = {"generate": [], "completions": [], "chat": []}
        self.in_flight = 0
        self.max_in_flight = 0
        self.usage, self.fail, self.empty_text = usage, fail, empty_text
        self.url = ""
        self._loop = None
        self._runner = None

    # ---------------------------------------------------------------- routes
    async def _enter(self, kind, request):
        body = await request.json()
        self.bodies[kind].append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        return body, resp

    async def _send(self, resp, obj):
        await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    async def generate(self, request):
        if self.fail:
            return web.json_response({"error": {"message": "nope"}}, status=400)
        body, resp = await self._enter("generate", request)
        n = body["sampling_params"]["max_new_tokens"]
        prompt = len(body["input_ids"])
        await asyncio.sleep(self.FIRST_DELAY)
        k = 1
        await self._send(resp, {"text": "a", "meta_info": {"prompt_tokens": prompt, "completion_tokens": 1}})
        while k < n:                              # two tokens per chunk after the first (cumulative text)
            await asyncio.sleep(self.STEP_DELAY)
            k = min(n, k + 2)
            await self._send(resp, {"text": "a" * k, "meta_info": {"prompt_tokens": prompt, "completion_tokens": k}})
        await self._send(resp, b"[DONE]")
        self.in_flight -= 1
        return resp

    async def openai(self, request, kind):
        if self.fail:
            return web.json_response({"error": {"message": "nope"}}, status=400)
        body, resp = await self._enter(kind, request)
        n = body["max_tokens"]
        if kind == "chat":
            await self._send(resp, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(self.FIRST_DELAY)
        running = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
        k = 0
        while k < n and not self.empty_text:     # with running usage: two tokens per chunk after the first
            if k:
                await asyncio.sleep(self.STEP_DELAY)
            k = min(n, k + (2 if running and k else 1))
            piece = {"index": 0, "delta": {"content": "x"}} if kind == "chat" else {"index": 0, "text": "x"}
            chunk = {"choices": [piece]}
            if running:
                chunk["usage"] = {"prompt_tokens": 1000 + n, "completion_tokens": k}
            await self._send(resp, chunk)
        await self._send(resp, {"choices": [{"index": 0, "delta": {}, "text": "", "finish_reason": "length"}]})
        if self.usage:
            await self._send(resp, {"choices": [], "usage": {"prompt_tokens": 1000 + n, "completion_tokens": n}})
        await self._send(resp, b"[DONE]")
        self.in_flight -= 1
        return resp

    async def completions(self, request):
        return await self.openai(request, "completions")

    async def chat(self, request):
        return await self.openai(request, "chat")

    async def server_info(self, request):
        if self.accept_length is None:
            raise web.HTTPNotFound()
        return web.json_response({"internal_states": [{"avg_spec_accept_length": self.accept_length}]})

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "Stub":
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            app = web.Application(client_max_size=64 << 20)
            app.router.add_post("/generate", self.generate)
            app.router.add_post("/v1/completions", self.completions)
            app.router.add_post("/v1/chat/completions", self.chat)
            app.router.add_get("/v1/models", self.models)
            app.router.add_get("/get_server_info", self.server_info)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            port = self._runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "stub server did not start"
        return self

    def stop(self) -> None:
        async def _cleanup():
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(_cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def stub():
    s = Stub().start()
    yield s
    s.stop()


@pytest.fixture
def make_stub():
    made = []

    def make(**kw) -> Stub:
        made.append(Stub(**kw).start())
        return made[-1]

    yield make
    for s in made:
        s.stop()
