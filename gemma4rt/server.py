"""`python -m gemma4rt.server`: the OpenAI-compatible HTTP server.

Main process: the aiohttp front door. It starts the engine process (scheduler + rank-0 worker),
waits for its ready handshake, serves HTTP, and supervises: if the engine dies, every open request
ends with an error, /health answers 503 and the server shuts down. SIGINT/SIGTERM drain: new work is
refused (503), open requests get a grace period, then the engine is told to stop and reaped."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Optional

from aiohttp import web

from gemma4rt.cli import parse_args
from gemma4rt.config import EngineConfig, ModelInfo, ServerConfig
from gemma4rt.runtime.process import EngineDied, EngineProcess

log = logging.getLogger("gemma4rt.server")
DRAIN_SECONDS = 10.0
ENGINE_DEAD_LINGER = 2.0        # keep answering /health 503 briefly before exiting


def server_args(eng_cfg: EngineConfig, srv: ServerConfig) -> dict:
    """The engine and server settings as one JSON-able dict (SGLang's /get_server_info), API key redacted."""
    import dataclasses
    d = {"engine": dataclasses.asdict(eng_cfg), "server": dataclasses.asdict(srv)}
    if d["server"].get("api_key"):
        d["server"]["api_key"] = "<redacted>"
    return d


def kv_info(pool_pages: dict[str, int], page_size: dict[str, int]) -> dict:
    """The KV pools for /get_server_info: tokens per pool, and SGLang's max_total_num_tokens (the pool that
    holds every token of a request: the full-attention one when there are several)."""
    tokens = {n: pool_pages[n] * page_size.get(n, 1) for n in pool_pages}
    main = tokens.get("full", min(tokens.values()) if tokens else 0)
    return {"kv_pool_tokens": tokens, "max_total_num_tokens": main}


async def serve(eng_cfg: EngineConfig, srv: ServerConfig) -> int:
    from gemma4rt.frontend.app import AppState, build_app
    from gemma4rt.frontend.frontdoor import FrontDoor
    from gemma4rt.frontend.media import MediaInput
    from gemma4rt.frontend.metrics import Metrics
    from gemma4rt.frontend.parsing import parsers_available
    from gemma4rt.frontend.tokenizer import TokenizerManager

    if eng_cfg.model_path is None and eng_cfg.runner != "noop":
        log.info("no --model-path: serving the built-in demo model (a tiny random Gemma 4, for trying the API)")
    proc = EngineProcess(eng_cfg, log_level=srv.log_level)
    loop = asyncio.get_running_loop()
    # import the tokenizer library while the engine process loads the model
    preload = loop.run_in_executor(None, lambda: __import__("transformers").AutoTokenizer)
    try:
        ready = await proc.start()
    except EngineDied as e:
        log.error("%s", e)
        await proc.stop(2.0)
        return 1
    mi = ModelInfo(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in ready.model_info.items()})
    served = eng_cfg.served_model_name or mi.name
    log.info("engine ready (pid %d): model %s, context %d, KV pools %s", ready.pid, served, mi.context_length,
             ready.pool_pages)
    await preload
    tok = TokenizerManager(eng_cfg.tokenizer_path or ready.tokenizer_path, srv.chat_template, mi.bos_token_id)
    metrics = Metrics(served) if srv.enable_metrics else None
    fd = FrontDoor(proc, tok, mi, eng_cfg.scheduler, metrics)
    fd.start()
    stop_event = asyncio.Event()
    exit_code = [0]

    def on_message(m):
        fd.send(m)

    def on_dead(reason: str):
        fd.on_engine_dead(reason)
        exit_code[0] = 1
        asyncio.get_running_loop().call_later(ENGINE_DEAD_LINGER, stop_event.set)
    proc.on_message = on_message
    proc.on_dead = on_dead

    names = {served, "default", mi.name}
    if eng_cfg.model_path:
        names.add(eng_cfg.model_path)
    if mi.model_path:
        names.add(mi.model_path)
    state = AppState(frontdoor=fd, tokenizer=tok, model_info=mi, served_name=served, model_names=names,
                     api_key=srv.api_key, metrics=metrics,
                     parsers=parsers_available(srv.reasoning_parser, srv.tool_call_parser),
                     media=MediaInput.for_server(mi, eng_cfg, srv, tok.tok),
                     chat_template_kwargs=dict(srv.default_chat_template_kwargs),
                     force_include_usage=srv.force_include_usage,
                     server_args=dict(server_args(eng_cfg, srv), **kv_info(ready.pool_pages, ready.pool_page_size)))
    app = build_app(state, srv.max_request_bytes)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, srv.host, srv.port)
    try:
        await site.start()
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", srv.host, srv.port, e)
        await proc.stop()
        await runner.cleanup()
        return 1
    log.info("serving on http://%s:%d (OpenAI API at /v1)", srv.host, srv.port)
    print(f"gemma4rt server ready on http://{srv.host}:{srv.port}", flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_event.set)
    await stop_event.wait()
    # drain
    fd.shutting_down = True
    if fd.engine_dead is None:
        log.info("shutting down: draining %d open requests", fd.num_open())
        t_end = loop.time() + DRAIN_SECONDS
        while fd.num_open() and loop.time() < t_end and fd.engine_dead is None:
            await asyncio.sleep(0.05)
    await proc.stop()
    await fd.stop(2.0)
    await runner.cleanup()
    tok.close()
    log.info("server stopped")
    return exit_code[0]


def main(argv: Optional[list[str]] = None) -> int:
    eng_cfg, srv, warnings = parse_args(argv)
    logging.basicConfig(level=srv.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for w in warnings:
        log.warning("%s", w)
    return asyncio.run(serve(eng_cfg, srv))


if __name__ == "__main__":
    sys.exit(main())
