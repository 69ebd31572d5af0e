"""Mixed load against a small KV cache: streaming and whole requests, n > 1, JSON schemas, forced tool
calls, clients that hang up mid-stream, preemption. Every request gets an answer or is cut by its
client, and the server ends idle with every page back and /health 200 (no leak, no wedge)."""
import asyncio
import random

from .conftest import Server

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}}}}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
    "type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}}}


def test_mixed_load_with_hangups_and_preemption():
    import aiohttp
    rnd = random.Random(1)
    # with overlap scheduling (a GPU server's default): the more intricate path under hangups and preemption
    s = Server("--enable-overlap-schedule", "--context-length", "1024", "--max-total-tokens", "1024",
               "--max-running-requests", "16",
               "--chunked-prefill-size", "64", "--tool-call-parser", "gemma4", "--reasoning-parser", "gemma4",
               timeout=300)

    async def one(sess, i):
        body = {"model": "default", "messages": [{"role": "user", "content": "x" * rnd.randint(1, 300)}],
                "max_tokens": rnd.randint(1, 160), "temperature": rnd.choice([0, 1.0]), "seed": i,
                "stream": rnd.random() < 0.6}
        r = rnd.random()
        if r < 0.2:
            body["response_format"] = SCHEMA
        elif r < 0.35:
            body.update(tools=TOOLS, tool_choice=rnd.choice(["auto", "required"]))
        if rnd.random() < 0.3:
            body["n"] = rnd.randint(2, 3)
        cut = rnd.random() < 0.25
        delay = rnd.random() * 0.5
        async with sess.post(s.url + "/v1/chat/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=120)) as resp:
            if cut:
                await asyncio.sleep(delay)
                resp.close()
                return "cut"
            await resp.read()
            return resp.status

    async def main():
        async with aiohttp.ClientSession() as sess:
            return await asyncio.gather(*(one(sess, i) for i in range(80)))
    try:
        res = asyncio.run(main())
        assert all(r in (200, "cut") for r in res), res
        d = s.wait_idle(timeout=30)
        assert d["num_preemptions"] > 0
        assert s.get("/health")[0] == 200
    finally:
        s.stop()
