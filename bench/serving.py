"""Online serving benchmark, compatible with SGLang's `bench_serving` (performance-targets.md §2).

    python -m bench.serving --backend sglang --port 30000 --dataset-name random \
        --num-prompts 1000 --max-concurrency 100                    # cookbook throughput run
    python -m bench.serving --backend sglang --num-prompts 10 --max-concurrency 1    # latency run
    python -m bench.serving --backend sglang-oai-chat --dataset-name image --image-count 2 \
        --image-resolution 720p --random-input-len 128 --random-output-len 1024 \
        --num-prompts 10 --max-concurrency 1                        # cookbook image run

Backends: sglang (native POST /generate, token ids), sglang-oai / vllm (POST /v1/completions),
sglang-oai-chat / vllm-chat (POST /v1/chat/completions). Prompts are synthetic token ids (random
lengths by SGLang's recipe, seed 1): sent as `input_ids` to /generate, as a token-id list to
/v1/completions (or text with --tokenizer), as text to chat (decoded with --tokenizer, else common
words). Output token counts come from the server (meta_info / usage), never from re-tokenizing.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp
import numpy as np

from bench.serving_metrics import RequestRecord, compute_metrics, format_table
from bench.workloads import BenchRequest, sample_image_requests, sample_random_requests

BACKENDS = {  # name -> (route, kind)
    "sglang": ("/generate", "generate"),
    "sglang-native": ("/generate", "generate"),
    "sglang-oai": ("/v1/completions", "completions"),
    "vllm": ("/v1/completions", "completions"),
    "sglang-oai-chat": ("/v1/chat/completions", "chat"),
    "vllm-chat": ("/v1/chat/completions", "chat"),
}


async def iter_sse(resp: aiohttp.ClientResponse):
    """Yield the payload of each `data:` line of an SSE (or line-delimited) stream."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl].strip(), buf[nl + 1:]
            if line.startswith(b"data:"):
                yield line[5:].strip().decode("utf-8", "replace")
    line = buf.strip()
    if line.startswith(b"data:"):
        yield line[5:].strip().decode("utf-8", "replace")


class _Tracker:
    """Turns 'now the request has n output tokens' observations into TTFT / ITL lists."""

    def __init__(self, rec: RequestRecord):
        self.rec, self.n, self.last = rec, 0, None

    def advance(self, n_total: int, now: float) -> None:
        new = n_total - self.n
        if new <= 0:
            return
        rec = self.rec
        if self.last is None:
            rec.ttft = now - rec.start
            rec.first_chunk_tokens = new
        else:
            gap = now - self.last
            rec.itl_chunk.append(gap)
            rec.itl.extend([gap / new] * new)
        self.last, self.n = now, n_total


@dataclasses.dataclass
class ClientOptions:
    model: str = "default"
    ignore_eos: bool = True
    extra: dict = dataclasses.field(default_factory=dict)      # merged into the sampling fields
    headers: Optional[dict] = None
    continuous_usage: bool = False                             # ask for running usage in every chunk


def _build_payload(kind: str, req: BenchRequest, opts: ClientOptions) -> dict:
    model, ignore_eos, extra = opts.model, opts.ignore_eos, opts.extra
    if kind == "generate":
        body: dict = {"input_ids": req.input_ids} if req.input_ids is not None else {"text": req.text}
        body["sampling_params"] = {"temperature": 0.0, "max_new_tokens": req.output_len,
                                   "ignore_eos": ignore_eos, **extra}
        body["stream"] = True
        return body
    body = {"model": model, "temperature": 0.0, "max_tokens": req.output_len, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos, **extra}
    if opts.continuous_usage:   # running usage in every chunk: exact tokens per chunk (vLLM, SGLang)
        body["stream_options"]["continuous_usage_stats"] = True
    if kind == "completions":
        body["prompt"] = req.input_ids if req.input_ids is not None else req.text
    else:
        text = req.text if req.text is not None else ""
        if req.images:
            content = [{"type": "image_url", "image_url": {"url": u}} for u in req.images]
            content.append({"type": "text", "text": text})
        else:
            content = text
        body["messages"] = [{"role": "user", "content": content}]
    return body


async def send_request(session: aiohttp.ClientSession, url: str, kind: str, req: BenchRequest,
                       opts: ClientOptions) -> RequestRecord:
    rec = RequestRecord(prompt_len=req.prompt_len)
    body = _build_payload(kind, req, opts)
    tr = _Tracker(rec)
    usage = None
    first_other = None         # first chunk after the role chunk (when no chunk carries any text)
    rec.start = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=opts.headers) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            async for data in iter_sse(resp):
                if data == "[DONE]":
                    continue
                obj = json.loads(data)
                if "error" in obj and not obj.get("choices") and "text" not in obj:
                    rec.error = f"stream error: {json.dumps(obj['error'])[:300]}"
                    return rec
                now = time.perf_counter()
                if kind == "generate":
                    meta = obj.get("meta_info") or {}
                    n = meta.get("completion_tokens")
                    if n is None:                       # no counts: one token per changed text
                        n = tr.n + (1 if obj.get("text") else 0)
                    if meta.get("prompt_tokens") is not None:
                        rec.server_prompt_len = int(meta["prompt_tokens"])
                    tr.advance(int(n), now)
                    continue
                if obj.get("usage"):
                    usage = obj["usage"]
                choices = obj.get("choices") or []
                if not choices:
                    first_other = first_other or now
                    continue
                c = choices[0]
                if kind == "completions":
                    piece = c.get("text") or ""
                else:
                    delta = c.get("delta") or {}
                    piece = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                    if delta.get("tool_calls"):
                        piece += json.dumps(delta["tool_calls"])
                if piece or c.get("finish_reason"):
                    first_other = first_other or now
                running = (obj.get("usage") or {}).get("completion_tokens")
                if running is not None and running > tr.n:   # continuous usage stats: exact counts
                    tr.advance(int(running), now)
                elif piece:
                    tr.advance(tr.n + 1, now)
        rec.latency = time.perf_counter() - rec.start
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    if kind == "generate":
        rec.output_len = tr.n
    elif usage and usage.get("completion_tokens") is not None:
        rec.output_len = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            rec.server_prompt_len = int(usage["prompt_tokens"])
    else:                                    # SGLang's OAI client falls back to the requested length
        rec.output_len, rec.usage_missing = req.output_len, True
    if tr.last is None and rec.output_len > 0 and not rec.usage_missing and first_other is not None:
        tr.advance(rec.output_len, first_other)       # tokens that detokenised to nothing (random weights)
    if tr.last is None:
        rec.error = "no generated tokens in the stream"
        return rec
    rec.success = True
    return rec


async def _request_times(n: int, rate: float, rng: np.random.RandomState):
    """Yield once per request: immediately for rate=inf, else after exponential gaps (Poisson)."""
    for _ in range(n):
        yield
        if rate != float("inf"):
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))


async def run_benchmark(base_url: str, backend: str, reqs: list[BenchRequest], opts: ClientOptions, *,
                        max_concurrency: Optional[int] = None, request_rate: float = float("inf"),
                        warmup_requests: int = 1, warmup_sleep: float = 1.0, seed: int = 1,
                        max_duration: Optional[float] = None, progress: bool = False):
    """Returns (records, duration, bench_start). Warm-up requests (output capped at 32) are not counted."""
    route, kind = BACKENDS[backend]
    url = base_url.rstrip("/") + route
    timeout = aiohttp.ClientTimeout(total=6 * 3600, sock_connect=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                     read_bufsize=1 << 20) as session:
        if warmup_requests > 0 and reqs:
            w = dataclasses.replace(reqs[0], output_len=min(reqs[0].output_len, 32))
            warm = await asyncio.gather(*[send_request(session, url, kind, w, opts)
                                          for _ in range(warmup_requests)])
            if not any(r.success for r in warm):
                raise RuntimeError(f"warm-up failed: {warm[0].error}")
            await asyncio.sleep(warmup_sleep)
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        done = [0]

        async def one(req: BenchRequest) -> RequestRecord:
            if sem is None:
                r = await send_request(session, url, kind, req, opts)
            else:
                async with sem:
                    r = await send_request(session, url, kind, req, opts)
            done[0] += 1
            if progress and (done[0] % max(1, len(reqs) // 20) == 0 or done[0] == len(reqs)):
                print(f"  {done[0]}/{len(reqs)} done", file=sys.stderr, flush=True)
            return r

        rng = np.random.RandomState(seed)
        bench_start = time.perf_counter()
        tasks = []
        it = iter(reqs)
        async for _ in _request_times(len(reqs), request_rate, rng):
            tasks.append(asyncio.create_task(one(next(it))))
        finished, pending = await asyncio.wait(tasks, timeout=max_duration)
        duration = time.perf_counter() - bench_start
        for t in pending:
            t.cancel()
        records = []
        for t, req in zip(tasks, reqs):
            if t in pending or t.cancelled():
                records.append(RequestRecord(prompt_len=req.prompt_len, error="cut off by --max-duration"))
            else:
                records.append(t.result())
        return records, duration, bench_start


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=sorted(BACKENDS), default="sglang")
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:30000 (overrides --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name sent to OpenAI routes (default: GET /v1/models)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer dir: send text prompts to OpenAI routes")
    p.add_argument("--dataset-name", choices=("random", "random-ids", "image"), default="random")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--token-id-range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="synthetic ids are drawn from [LOW, HIGH) (default 1000 100000, clamped to the tokenizer)")
    p.add_argument("--image-count", type=int, default=1)
    p.add_argument("--image-resolution", default="1080p", help="720p, 1080p, 360p, 4k or HxW")
    p.add_argument("--image-content", choices=("blocks", "noise", "blank"), default="blocks")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at t=0")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--max-duration", type=float, default=None,
                   help="cut the run off after this many seconds (unfinished requests count as failed)")
    p.add_argument("--extra-request-body", default=None, help="JSON merged into each request's sampling fields")
    p.add_argument("--continuous-usage-stats", action="store_true",
                   help="ask OpenAI routes for running usage in every chunk (exact tokens per chunk)")
    p.add_argument("--output-file", default=None, help="append one JSON line with the configuration and metrics")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", default=None, help="free text stored in the JSON line")
    return p


def _base_url(a) -> str:
    return (a.base_url or f"http://{a.host}:{a.port}").rstrip("/")


async def _model_name(base: str, headers: Optional[dict]) -> str:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            async with s.get(base + "/v1/models", headers=headers) as r:
                if r.status == 200:
                    data = (await r.json()).get("data") or []
                    if data:
                        return data[0]["id"]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
        pass
    return "default"


async def _accept_length(base: str, headers: Optional[dict]) -> Optional[float]:
    """The server's average accepted length under speculative decoding, from /get_server_info (as SGLang's
    bench_serving reads it); None when the server does not report one."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            async with s.get(base + "/get_server_info", headers=headers) as r:
                if r.status == 200:
                    states = (await r.json()).get("internal_states") or [{}]
                    v = states[0].get("avg_spec_accept_length")
                    return float(v) if v is not None else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def build_requests(a, tokenizer) -> list[BenchRequest]:
    kind = BACKENDS[a.backend][1]
    rng_range = tuple(a.token_id_range) if a.token_id_range else None
    if a.dataset_name == "image":
        if kind != "chat":
            raise SystemExit("--dataset-name image needs a chat backend (sglang-oai-chat or vllm-chat)")
        return sample_image_requests(a.num_prompts, a.random_input_len, a.random_output_len, a.random_range_ratio,
                                     a.seed, image_count=a.image_count, resolution=a.image_resolution,
                                     content=a.image_content, tokenizer=tokenizer, id_range=rng_range)
    if kind == "generate" or (kind == "completions" and tokenizer is None):
        mode = "ids"
    else:
        mode = "text" if tokenizer is not None else "words"
    return sample_random_requests(a.num_prompts, a.random_input_len, a.random_output_len, a.random_range_ratio,
                                  a.seed, mode=mode, tokenizer=tokenizer, id_range=rng_range)


def main(argv: Optional[list[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    tokenizer = None
    if a.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    base = _base_url(a)
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    extra = json.loads(a.extra_request_body) if a.extra_request_body else None
    reqs = build_requests(a, tokenizer)
    model = a.model or asyncio.run(_model_name(base, headers))
    print(f"#requests {len(reqs)}; input tokens {sum(r.prompt_len for r in reqs)}; "
          f"output tokens {sum(r.output_len for r in reqs)}; {a.backend} -> {base}", file=sys.stderr)
    opts = ClientOptions(model=model, ignore_eos=not a.disable_ignore_eos, extra=extra or {}, headers=headers,
                         continuous_usage=a.continuous_usage_stats)
    records, duration, start = asyncio.run(run_benchmark(
        base, a.backend, reqs, opts, max_concurrency=a.max_concurrency, request_rate=a.request_rate,
        warmup_requests=a.warmup_requests, seed=a.seed, max_duration=a.max_duration, progress=True))
    m = compute_metrics(records, duration, start)
    m["accept_length"] = asyncio.run(_accept_length(base, headers))
    cfg = {"backend": a.backend, "base_url": base, "model": model, "dataset_name": a.dataset_name,
           "num_prompts": a.num_prompts, "random_input_len": a.random_input_len,
           "random_output_len": a.random_output_len, "random_range_ratio": a.random_range_ratio,
           "request_rate": a.request_rate if np.isfinite(a.request_rate) else "inf",
           "max_concurrency": a.max_concurrency, "seed": a.seed,
           "ignore_eos": not a.disable_ignore_eos, "warmup_requests": a.warmup_requests,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tag": a.tag,
           "cut_off": any(r.error == "cut off by --max-duration" for r in records)}
    if a.dataset_name == "image":
        cfg.update(image_count=a.image_count, image_resolution=a.image_resolution)
    print(format_table(m, cfg))
    result = {**cfg, **m}
    if a.output_file:
        with open(a.output_file, "a") as f:
            f.write(json.dumps(result, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
