"""OpenAI error envelopes and the exception that carries them out of a handler."""
from __future__ import annotations

import json
from typing import Optional

from aiohttp import web

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "InternalServerError",
          501: "not_implemented", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, err_type: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.err_type = err_type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=json.dumps(self.body()),
                            content_type="application/json", headers=self.headers)


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


def context_error(num_input: int, num_completion: int, context_length: int) -> APIError:
    """SGLang's wording, verbatim (client libraries match on it)."""
    total = num_input + num_completion
    return bad_request(
        f"Requested token count exceeds the model's maximum context length of {context_length} tokens. "
        f"You requested a total of {total} tokens: {num_input} tokens from the input messages and "
        f"{num_completion} tokens for the completion. Please reduce the number of tokens in the input "
        f"messages or the completion to fit within the limit.", param="max_tokens")


def prompt_too_long(num_input: int, context_length: int) -> APIError:
    return bad_request(f"The input ({num_input} tokens) is longer than the model's context length "
                       f"({context_length} tokens).", param="messages")
