"""Command line: SGLang flag names (plus a few vLLM aliases) mapped onto the config.py dataclasses.

Each row of FLAGS names the flag(s), the config section and field it sets, and its type; the
default comes from the dataclass itself. SGLang flags we do not implement are accepted with a
warning (IGNORED_FLAGS); anything else unknown is an error."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Optional

from gemma4rt.config import (
    CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, ServerConfig, SpeculativeConfig,
)

log = logging.getLogger("gemma4rt.cli")

_SECTIONS = {"engine": EngineConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
             "parallel": ParallelConfig, "server": ServerConfig, "speculative": SpeculativeConfig}

# (flags, section, field, type, help); type "flag" = store_true
FLAGS = [
    (["--model-path", "--model"], "engine", "model_path", str, "checkpoint dir or HF repo id (default: the built-in demo model)"),
    (["--tokenizer-path"], "engine", "tokenizer_path", str, "tokenizer dir (default: the model's)"),
    (["--revision"], "engine", "revision", str, "HF revision"),
    (["--served-model-name"], "engine", "served_model_name", str, "name reported by /v1/models"),
    (["--dtype"], "engine", "dtype", str, "auto | bfloat16 | float16 | float32"),
    (["--device"], "engine", "device", str, "auto | cpu | cuda | cuda:N"),
    (["--load-format"], "engine", "load_format", str, "auto | dummy (random weights)"),
    (["--runner"], "engine", "runner", str, "auto | noop (fake tokens, no model: tests and benchmarks)"),
    (["--context-length", "--max-model-len"], "engine", "context_length", int, "max context (default: the model's)"),
    (["--random-seed", "--seed"], "engine", "seed", int, "global random seed"),
    (["--disable-cuda-graph", "--enforce-eager"], "engine", "disable_cuda_graph", "flag", "no CUDA graphs"),
    (["--cuda-graph-max-bs"], "engine", "cuda_graph_max_bs", int, "largest batch captured in a CUDA graph"),
    (["--cuda-graph-max-tokens"], "engine", "cuda_graph_max_tokens", int,
     "also capture CUDA graphs for steps that carry prompt tokens (mixed prefill + decode), up to this many "
     "tokens a step, padded to buckets of 128 tokens up to 1024, 256 up to 4096, 512 beyond (default 1024; "
     "0: off)"),
    (["--page-size", "--block-size"], "cache", "page_size", int, "tokens per KV page"),
    (["--mem-fraction-static", "--gpu-memory-utilization"], "cache", "mem_fraction_static", float,
     "fraction of GPU memory for weights + KV"),
    (["--max-total-tokens"], "cache", "max_total_tokens", int, "KV pool size in tokens"),
    (["--disable-radix-cache", "--no-enable-prefix-caching"], "cache", "disable_radix_cache", "flag",
     "no prefix cache"),
    (["--kv-cache-dtype"], "cache", "kv_cache_dtype", str, "auto (the model dtype; fp8 is not implemented)"),
    (["--max-running-requests", "--max-num-seqs"], "scheduler", "max_running_requests", int,
     "requests in one batch at most"),
    (["--max-queued-requests"], "scheduler", "max_queued_requests", int, "waiting requests before 429"),
    (["--chunked-prefill-size", "--max-num-batched-tokens"], "scheduler", "chunked_prefill_size", int,
     "tokens per step (-1: whole prompts)"),
    (["--schedule-policy"], "scheduler", "schedule_policy", str, "fcfs"),
    (["--scheduler-recv-interval"], "scheduler", "scheduler_recv_interval", int, "poll new requests every N steps"),
    (["--scheduler-delay-factor"], "scheduler", "delay_factor", float,
     "while requests run, hold new prompts until the oldest has waited this many times the last prompt "
     "step's latency, so that several are prefilled in one step (vLLM's flag; 0: at once)"),
    (["--enable-overlap-schedule", "--async-scheduling"], "scheduler", "overlap_schedule", "flag",
     "make and launch step k+1 while step k runs on the device (its sampled tokens stay there); the "
     "default on a GPU (on the CPU only with this flag); off by itself with --tp > 1, --ple-on-host or "
     "speculative decoding"),
    (["--disable-overlap-schedule"], "scheduler", "disable_overlap_schedule", "flag",
     "SGLang's flag: no overlap scheduling (wins over --enable-overlap-schedule)"),
    (["--speculative-algorithm"], "speculative", "algorithm", str,
     "NEXTN (also EAGLE, MTP): speculative decoding with the Gemma 4 assistant drafter named by "
     "--speculative-draft-model-path (a chain of drafts verified by the target; outputs as without it)"),
    (["--speculative-draft-model-path"], "speculative", "draft_model_path", str,
     "the target's -assistant checkpoint (local path or hub id; a built-in name with --load-format dummy)"),
    (["--speculative-num-steps"], "speculative", "num_steps", int, "drafts per step"),
    (["--speculative-num-draft-tokens"], "speculative", "num_draft_tokens", int,
     "tokens a verification step scores: num_steps + 1 (a chain)"),
    (["--speculative-eagle-topk"], "speculative", "eagle_topk", int, "draft branches per step: 1 (a chain)"),
    (["--tp", "--tp-size", "--tensor-parallel-size"], "parallel", "tp", int, "tensor-parallel ranks, one GPU each"),
    (["--host"], "server", "host", str, "bind address"),
    (["--port"], "server", "port", int, "HTTP port"),
    (["--api-key"], "server", "api_key", str, "require 'Authorization: Bearer KEY'"),
    (["--enable-metrics"], "server", "enable_metrics", "flag", "serve Prometheus /metrics"),
    (["--log-level"], "server", "log_level", str, "debug | info | warning | error"),
    (["--reasoning-parser"], "server", "reasoning_parser", str, "gemma4"),
    (["--tool-call-parser"], "server", "tool_call_parser", str, "gemma4"),
    (["--chat-template"], "server", "chat_template", str, "jinja file overriding the checkpoint's template"),
    (["--default-chat-template-kwargs"], "server", "default_chat_template_kwargs", "json",
     'chat template arguments for every request (a request\'s own win), e.g. \'{"enable_thinking": true}\''),
    (["--max-request-bytes"], "server", "max_request_bytes", int, "largest accepted request body"),
    (["--enable-force-include-usage"], "server", "force_include_usage", "flag",
     "a usage chunk ends every stream, as if stream_options.include_usage were set"),
    (["--limit-mm-per-prompt"], "server", "limit_mm_per_prompt", "json",
     'most media items per request, JSON, e.g. \'{"image": 4, "audio": 1, "video": 1}\''),
    (["--mm-processor-kwargs"], "server", "mm_processor_kwargs", "json",
     'preprocessing options, JSON: {"max_soft_tokens": 70|140|280|560|1120} (image token budget)'),
    (["--allow-private-media-urls"], "server", "allow_private_media_urls", "flag",
     "let image/audio URLs reach private and loopback addresses (refused by default)"),
    (["--media-fetch-timeout"], "server", "media_fetch_timeout", float, "seconds to fetch one media URL"),
    (["--max-media-bytes"], "server", "max_media_bytes", int, "largest accepted media item, bytes"),
    (["--ple-on-host"], "engine", "ple_on_host", "flag",
     "E2B/E4B: keep the per-layer embedding table in pinned host memory (saves 2.3-2.8 GB of GPU memory)"),
]

# vLLM flags that ask for what gemma4rt always does: accepted silently.
DEFAULT_BEHAVIOUR_FLAGS = {"--enable-prefix-caching", "--enable-chunked-prefill"}

# SGLang / vLLM flags accepted for compatibility and ignored (with a warning).
IGNORED_FLAGS = {
    "--trust-remote-code": 0, "--quantization": 1, "--attention-backend": 1, "--prefill-attention-backend": 1,
    "--decode-attention-backend": 1, "--mm-attention-backend": 1, "--dp-size": 1, "--pp-size": 1,
    "--ep-size": 1, "--max-prefill-tokens": 1, "--enable-mixed-chunk": 0, "--schedule-conservativeness": 1,
    "--enable-priority-scheduling": 0, "--swa-full-tokens-ratio": 1, "--stream-interval": 1,
    "--incremental-streaming-output": 0, "--disable-piecewise-cuda-graph": 0, "--grammar-backend": 1, "--sampling-defaults": 1,
    "--enable-cache-report": 0, "--log-requests": 0, "--log-requests-level": 1, "--allow-auto-truncate": 0,
    "--watchdog-timeout": 1, "--skip-server-warmup": 0, "--enable-deterministic-inference": 0,
    "--admin-api-key": 1, "--hf-chat-template-name": 1, "--completion-template": 1,
    "--tokenizer-metrics-custom-labels-header": 1, "--bucket-time-to-first-token": 1,
    "--bucket-inter-token-latency": 1, "--bucket-e2e-request-latency": 1, "--limit-mm-data-per-request": 1,
    "--mm-process-config": 1, "--mm-per-request-timeout": 1, "--mm-max-concurrent-calls": 1,
    "--enable-auto-tool-choice": 0, "--disable-log-requests": 0, "--uvicorn-log-level": 1, "--swap-space": 1,
    "--generation-config": 1,
    "--constrained-json-whitespace-pattern": 1, "--constrained-json-disable-any-whitespace": 0,
    "--enable-torch-compile": 0, "--torch-compile-max-bs": 1, "--kv-cache-dtype-skip": 1,
}


def _default(section: str, name: str):
    for f in dataclasses.fields(_SECTIONS[section]):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()       # type: ignore[misc]
    raise KeyError(name)


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}")
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gemma4rt.server",
                                 description="Serve a Gemma 4 model through the OpenAI HTTP API.")
    for flags, section, name, typ, help_ in FLAGS:
        dest = f"{section}.{name}"
        d = _default(section, name)
        if typ == "flag":
            ap.add_argument(*flags, dest=dest, action="store_true", default=d, help=help_)
        elif typ == "json":
            ap.add_argument(*flags, dest=dest, type=_json_object, default=d, metavar="JSON",
                            help=f"{help_} (default: {json.dumps(d)})")
        else:
            ap.add_argument(*flags, dest=dest, type=typ, default=d, metavar=name.upper(),
                            help=f"{help_} (default: {d})")
    ap.add_argument("--speculative-config", dest=_SPEC_CONFIG, type=_json_object, default=None, metavar="JSON",
                    help='vLLM\'s form of the speculative flags: {"model": "<target>-assistant", '
                         '"num_speculative_tokens": N} (method "mtp" or absent)')
    return ap


_SPEC_CONFIG = "speculative_config_json"      # (not a config field: parse_args maps it onto SpeculativeConfig)
_SPEC_METHODS = (None, "mtp", "eagle", "eagle3", "draft_model", "nextn")


def _speculative_config(ap: argparse.ArgumentParser, cfg: dict, sp: SpeculativeConfig,
                        warnings: list[str]) -> SpeculativeConfig:
    """vLLM's --speculative-config JSON as SpeculativeConfig (the assistant drafter, a chain of drafts)."""
    if sp.algorithm is not None or sp.draft_model_path is not None:
        ap.error("--speculative-config and the --speculative-* flags are two forms of the same setting: use one")
    method = cfg.get("method")
    if method is not None and str(method).lower() not in _SPEC_METHODS[1:]:
        ap.error(f"--speculative-config: method {method!r} is not implemented (the Gemma 4 assistant drafter: "
                 f'"mtp")')
    if not isinstance(cfg.get("model"), str) or not cfg["model"]:
        ap.error('--speculative-config needs "model": the target\'s -assistant checkpoint')
    n = cfg.get("num_speculative_tokens", sp.num_steps)
    if not isinstance(n, int) or isinstance(n, bool):
        ap.error(f"--speculative-config: num_speculative_tokens must be an integer, got {n!r}")
    for k in sorted(set(cfg) - {"model", "method", "num_speculative_tokens"}):
        warnings.append(f"--speculative-config: {k!r} is not implemented by gemma4rt and is ignored")
    return dataclasses.replace(sp, algorithm="NEXTN", draft_model_path=cfg["model"], num_steps=n)


def parse_args(argv: Optional[list[str]] = None) -> tuple[EngineConfig, ServerConfig, list[str]]:
    """Returns (engine config, server config, warnings about ignored flags)."""
    ap = build_parser()
    ns, extra = ap.parse_known_args(argv)
    warnings, bad = [], []
    i = 0
    while i < len(extra):
        a = extra[i]
        name = a.split("=", 1)[0]
        if name in DEFAULT_BEHAVIOUR_FLAGS and "=" not in a:
            pass
        elif name in IGNORED_FLAGS:
            warnings.append(f"{name} is not implemented by gemma4rt and is ignored")
            if "=" not in a and IGNORED_FLAGS[name] and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                i += 1
        else:
            bad.append(a)
        i += 1
    if bad:
        ap.error("unrecognized arguments: " + " ".join(bad))
    vals: dict[str, dict] = {s: {} for s in _SECTIONS}
    given = vars(ns)
    spec_json = given.pop(_SPEC_CONFIG)
    for k, v in given.items():
        s, f = k.split(".", 1)
        vals[s][f] = v
    srv = ServerConfig(**vals["server"])
    spec = SpeculativeConfig(**vals["speculative"])
    if spec_json is not None:
        spec = _speculative_config(ap, spec_json, spec, warnings)
    eng = EngineConfig(cache=CacheConfig(**vals["cache"]), scheduler=SchedulerConfig(**vals["scheduler"]),
                       parallel=ParallelConfig(**vals["parallel"]), speculative=spec, **vals["engine"])
    for p, flag in ((srv.reasoning_parser, "--reasoning-parser"), (srv.tool_call_parser, "--tool-call-parser")):
        if p not in (None, "gemma4", "auto"):
            ap.error(f"{flag}: only 'gemma4' is supported, got {p!r}")
    for k, v in srv.limit_mm_per_prompt.items():
        if k not in ("image", "audio", "video") or not isinstance(v, int) or isinstance(v, bool) or v < 0:
            ap.error(f'--limit-mm-per-prompt: expected {{"image": N, "audio": N, "video": N}} with N >= 0, '
                     f'got {k!r}: {v!r}')
    for k, v in srv.mm_processor_kwargs.items():
        if k != "max_soft_tokens" or v not in (70, 140, 280, 560, 1120):
            ap.error(f"--mm-processor-kwargs: only max_soft_tokens in 70, 140, 280, 560, 1120 is supported, got {k}={v!r}")
    sp = eng.speculative
    if sp.algorithm is not None or sp.draft_model_path is not None:
        if (sp.algorithm or "").upper() not in ("NEXTN", "EAGLE", "MTP"):
            ap.error(f"--speculative-algorithm: NEXTN, EAGLE or MTP (the assistant drafter), got {sp.algorithm!r}")
        if not sp.draft_model_path:
            ap.error("--speculative-algorithm needs --speculative-draft-model-path (the target's -assistant model)")
        if not 1 <= sp.num_steps <= 7:
            ap.error(f"--speculative-num-steps (num_speculative_tokens) must be 1..7 (a verification step scores at "
                     f"most 8 tokens), got {sp.num_steps}")
        if sp.num_draft_tokens is not None and sp.num_draft_tokens != sp.num_steps + 1:
            ap.error(f"--speculative-num-draft-tokens must be --speculative-num-steps + 1 (a chain), got {sp.num_draft_tokens}")
        if sp.eagle_topk != 1:
            ap.error(f"--speculative-eagle-topk: only 1 (a chain of drafts) is implemented, got {sp.eagle_topk}")
        if eng.parallel.tp != 1:
            ap.error("speculative decoding runs with --tp 1 only")
    if eng.parallel.tp < 1:
        ap.error(f"--tp must be at least 1, got {eng.parallel.tp}")
    if eng.cache.kv_cache_dtype not in ("auto", "bfloat16", "bf16"):
        ap.error(f"--kv-cache-dtype {eng.cache.kv_cache_dtype}: only auto (the model dtype) is implemented")
    if eng.load_format not in ("auto", "dummy"):
        ap.error(f"--load-format must be auto or dummy, got {eng.load_format!r}")
    if eng.runner not in ("auto", "noop"):
        ap.error(f"--runner must be auto or noop, got {eng.runner!r}")
    return eng, srv, warnings
