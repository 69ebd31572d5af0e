"""The aiohttp application: routes, auth, error envelopes, body limit."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from aiohttp import web

from gemma4rt.frontend import chat, completions, native
from gemma4rt.frontend.errors import APIError

log = logging.getLogger(__name__)


@dataclass
class AppState:
    frontdoor: object
    tokenizer: object
    model_info: object
    served_name: str
    model_names: set
    api_key: Optional[str] = None
    metrics: object = None
    parsers: dict = field(default_factory=lambda: {"reasoning": False, "tool": False})
    media: object = None                   # frontend.media.MediaInput; None: a text-only model
    chat_template_kwargs: dict = field(default_factory=dict)   # --default-chat-template-kwargs
    force_include_usage: bool = False      # --enable-force-include-usage
    server_args: dict = field(default_factory=dict)   # the engine and server settings (/get_server_info)
    created: int = field(default_factory=lambda: int(time.time()))


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as e:
        return e.response()
    except web.HTTPRequestEntityTooLarge as e:
        return APIError(413, f"The request body is too large ({e.text}).").response()
    except web.HTTPNotFound:
        return APIError(404, f"No route for {request.path}.", code="not_found").response()
    except web.HTTPMethodNotAllowed:
        return APIError(405, f"{request.method} is not allowed on {request.path}.").response()
    except web.HTTPException:
        raise
    except (ConnectionResetError, ConnectionError):
        raise
    except Exception as e:
        log.exception("handler failed")
        return APIError(500, f"Internal server error: {type(e).__name__}: {e}").response()


def _auth(key: str):
    want = f"Bearer {key}"

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.method == "OPTIONS" or request.path.startswith("/health") or request.path == "/ping":
            return await handler(request)
        if request.headers.get("Authorization", "") != want:
            return web.Response(status=401, text=json.dumps({"error": "Unauthorized"}),
                                content_type="application/json")
        return await handler(request)
    return auth


def build_app(state: AppState, max_request_bytes: int) -> web.Application:
    mws = [_errors]
    if state.api_key:
        mws.insert(0, _auth(state.api_key))
    app = web.Application(middlewares=mws, client_max_size=max_request_bytes)
    app["state"] = state
    r = app.router
    r.add_post("/v1/chat/completions", chat.chat_completions)
    r.add_post("/invocations", chat.chat_completions)      # SageMaker's inference route, as SGLang serves it
    r.add_post("/v1/completions", completions.completions)
    r.add_get("/v1/models", native.models)
    r.add_get("/v1/models/{model:.+}", native.model_card)
    r.add_get("/health", native.health)
    r.add_get("/ping", native.health)            # SageMaker-style liveness, as SGLang and vLLM answer it
    r.add_post("/ping", native.health)
    r.add_get("/health_generate", native.health_generate)
    r.add_get("/metrics", native.metrics)
    r.add_post("/generate", native.generate)
    for p in ("/v1/tokenize", "/tokenize"):
        r.add_post(p, native.tokenize)
    for p in ("/v1/detokenize", "/detokenize"):
        r.add_post(p, native.detokenize)
    r.add_post("/abort_request", native.abort_request)
    r.add_post("/flush_cache", native.flush_cache)
    r.add_get("/get_load", native.get_load)
    r.add_get("/get_model_info", native.model_info)
    r.add_get("/get_server_info", native.server_info)
    r.add_get("/version", native.version)
    return app
