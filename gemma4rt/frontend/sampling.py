"""Request-body validation shared by the routes: typed field access (400 naming the field, never
422; unknown fields ignored) and the mapping of OpenAI/SGLang sampling fields to SamplingParams."""
from __future__ import annotations

import math
from typing import Any, Optional

from gemma4rt.frontend.errors import bad_request, context_error, prompt_too_long
from gemma4rt.protocol import GrammarSpec, SamplingParams

_MISSING = object()
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_N = 128
MAX_TOP_LOGPROBS = 20


def field(body: dict, name: str, kind: str, default: Any = None, lo=None, hi=None) -> Any:
    """kind: int | float | bool | str | list | dict | any."""
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "list": isinstance(v, list),
        "dict": isinstance(v, dict),
        "any": True,
    }[kind]
    if kind == "int" and isinstance(v, float) and v.is_integer():
        v, ok = int(v), True
    if not ok:
        raise bad_request(f"'{name}' must be of type {kind}, got {type(v).__name__}.", param=name)
    if kind == "int" and not INT64_MIN <= v <= INT64_MAX:
        raise bad_request(f"'{name}' is out of range (a 64-bit signed integer), got {v}.", param=name)
    if kind == "float" and not math.isfinite(v):
        raise bad_request(f"'{name}' must be a finite number, got {v}.", param=name)
    if lo is not None and v < lo:
        raise bad_request(f"'{name}' must be >= {lo}, got {v}.", param=name)
    if hi is not None and v > hi:
        raise bad_request(f"'{name}' must be <= {hi}, got {v}.", param=name)
    return float(v) if kind == "float" else v


# Fields of SGLang's or vLLM's request types that this server does not implement: a request that sets one
# (to anything but its default) is a 400 rather than served as if it had not (unknown fields are ignored).
_SET = lambda v: v not in (None, False, 0, "", [], {})        # noqa: E731
_GIVEN = lambda v: v is not None                              # noqa: E731
REFUSED = {
    "stop_regex": (_GIVEN, "use 'stop' strings"),
    "lora_path": (_SET, "this server loads no LoRA adapters"),
    "return_hidden_states": (_SET, "hidden states are not returned"),
    "mm_processor_kwargs": (_SET, "images and audio are processed with the server's settings "
                                  "(--mm-processor-kwargs at start-up)"),
    "priority": (_SET, "requests are served first come, first served (no priority scheduling)"),
}
CHAT_REFUSED = {
    **REFUSED,
    "input_ids": (_GIVEN, "send 'messages'; the chat template is always applied"),
    "echo": (_SET, "use /v1/completions with 'echo'"),
    "chat_template": (_SET, "start the server with --chat-template"),
    "stream_reasoning": (lambda v: v is False, "the reasoning streams as it is generated"),
}

SAMPLING_PARAMS_REFUSED = {          # inside /generate's sampling_params
    "stop_regex": (_GIVEN, "use 'stop' strings"),
    "structural_tag": (_GIVEN, "use json_schema, regex or ebnf"),
}


def refuse_unimplemented(body: dict, table: dict, prefix: str = "") -> None:
    for name, (is_set, why) in table.items():
        if name in body and is_set(body[name]):
            raise bad_request(f"'{prefix}{name}' is not implemented by this server: {why}.", param=name)


def client_rid(body: dict) -> Optional[str]:
    """The request id a client chose: SGLang's "rid" or vLLM's "request_id" (a string), else None."""
    for name in ("rid", "request_id"):
        v = body.get(name)
        if v is None:
            continue
        if not isinstance(v, str) or not v:
            raise bad_request(f"'{name}' must be a non-empty string.", param=name)
        return v
    return None


def stream_fields(body: dict, force_usage: bool = False) -> tuple[bool, bool, bool]:
    """(stream, stream_options.include_usage, stream_options.continuous_usage_stats); force_usage
    (--enable-force-include-usage) sets include_usage for every stream."""
    stream = field(body, "stream", "bool", False)
    so = field(body, "stream_options", "dict", None)
    if so is not None and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    return stream, bool(so and so.get("include_usage")) or force_usage, bool(so and so.get("continuous_usage_stats"))


def stop_strings(body: dict, name: str = "stop") -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > 16:
            raise bad_request(f"'{name}' may hold at most 16 strings.", param=name)
        return [s for s in v if s]
    raise bad_request(f"'{name}' must be a string or a list of strings.", param=name)


def int_list(body: dict, name: str) -> list[int]:
    v = body.get(name)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise bad_request(f"'{name}' must be a list of integers.", param=name)
    return v


def logit_bias(body: dict, vocab_size: int) -> Optional[dict[int, float]]:
    v = field(body, "logit_bias", "dict")
    if not v:
        return None
    out = {}
    for k, b in v.items():
        try:
            t = int(k)
        except (TypeError, ValueError):
            raise bad_request(f"'logit_bias' keys must be token ids, got {k!r}.", param="logit_bias")
        if not 0 <= t < vocab_size:
            raise bad_request(f"'logit_bias' token id {t} is out of range.", param="logit_bias")
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not -100 <= b <= 100:
            raise bad_request("'logit_bias' values must be numbers in [-100, 100].", param="logit_bias")
        out[t] = float(b)
    return out


def check_token_ids(ids: list[int], vocab_size: int, name: str) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise bad_request(f"'{name}' holds token id {t}, outside the vocabulary (0..{vocab_size - 1}).",
                              param=name)


def build_sampling(body: dict, src: dict, model_info, num_prompt_tokens: int,
                   max_tokens: Optional[int], *, logprobs: bool = False, top_logprobs: int = 0,
                   prompt_logprobs: bool = False, grammar: Optional[GrammarSpec] = None) -> SamplingParams:
    """src: where sampling fields live (the body itself, or /generate's sampling_params)."""
    ctx = model_info.context_length
    if num_prompt_tokens >= ctx:
        raise prompt_too_long(num_prompt_tokens, ctx)
    if max_tokens is None:
        max_new = ctx - num_prompt_tokens
    else:
        if num_prompt_tokens + max_tokens > ctx:
            raise context_error(num_prompt_tokens, max_tokens, ctx)
        max_new = max_tokens
    d = model_info.generation_defaults or {}
    vocab = model_info.vocab_size
    stop_ids = int_list(src, "stop_token_ids")
    check_token_ids(stop_ids, vocab, "stop_token_ids")
    min_tokens = field(src, "min_tokens", "int", None, lo=0)
    if min_tokens is None:
        min_tokens = field(src, "min_new_tokens", "int", 0, lo=0)
    top_k = field(src, "top_k", "int", d.get("top_k", -1))
    if top_k is not None and top_k < -1:
        raise bad_request("'top_k' must be -1 (off) or >= 1.", param="top_k")
    return SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=min(min_tokens, max_new),
        temperature=field(src, "temperature", "float", float(d.get("temperature", 1.0)), lo=0.0, hi=2.0),
        top_p=_top_p(field(src, "top_p", "float", float(d.get("top_p", 1.0)), lo=0.0, hi=1.0)),
        top_k=top_k if top_k and 0 < top_k < vocab else -1,          # k >= the vocabulary: no cut
        min_p=field(src, "min_p", "float", float(d.get("min_p", 0.0)), lo=0.0, hi=1.0),
        repetition_penalty=field(src, "repetition_penalty", "float", float(d.get("repetition_penalty", 1.0)),
                                 lo=0.01, hi=10.0),
        frequency_penalty=field(src, "frequency_penalty", "float", 0.0, lo=-2.0, hi=2.0),
        presence_penalty=field(src, "presence_penalty", "float", 0.0, lo=-2.0, hi=2.0),
        seed=field(src, "seed", "int", field(src, "sampling_seed", "int", None)),     # (SGLang's name)
        stop_token_ids=stop_ids,
        ignore_eos=field(src, "ignore_eos", "bool", False),
        logprobs=logprobs or top_logprobs > 0,
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=logit_bias(src, vocab),
        suppress_token_ids=list(model_info.suppress_token_ids),
        grammar=grammar,
    )


def _top_p(v: float) -> float:
    if v <= 0.0:
        raise bad_request("'top_p' must be in (0, 1].", param="top_p")
    return v


def with_seed(sp: SamplingParams, i: int) -> SamplingParams:
    """The i-th choice of an n > 1 request: seed + i when a seed is given (wrapped into 64 bits)."""
    import msgspec
    if sp.seed is None or i == 0:
        return sp
    return msgspec.structs.replace(sp, seed=(sp.seed + i - INT64_MIN) % (1 << 64) + INT64_MIN)
