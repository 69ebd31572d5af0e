"""Small frozen dataclasses that configure every room: the engine (model, cache, scheduler, parallel)
and the server. cli.py builds its argparse from these; the offline LLM fills them from keywords.

The Gemma 4 *model* geometry (parsed from a checkpoint's config.json) lives in model_config.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class PoolSpec:
    """One KV page pool: every page holds `page_size` token slots for every layer of one attention
    geometry. `sliding_window` (W keys including the current one) is set for the sliding pool:
    pages whose tokens all lie before the window of the next query may be handed back."""

    name: str                       # "sliding" | "full"
    num_pages: int
    page_size: int
    sliding_window: Optional[int] = None
    bytes_per_page: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """What the scheduler and the front door need to know about the loaded model."""

    name: str                       # served model name
    model_path: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    pad_token_id: int
    suppress_token_ids: tuple[int, ...] = ()     # never sampled (unified 12B: EOI/EOA)
    image_token_id: Optional[int] = None
    audio_token_id: Optional[int] = None
    video_token_id: Optional[int] = None
    has_vision: bool = False
    has_audio: bool = False
    bidirectional_vision: bool = False
    generation_defaults: dict = field(default_factory=dict)   # from generation_config.json


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    # KV budget. On a GPU the pools are sized from mem_fraction_static after a profiling step;
    # on the CPU (or when set) max_total_tokens bounds the full pool and sizes the sliding pool.
    mem_fraction_static: float = 0.85
    max_total_tokens: Optional[int] = None
    disable_radix_cache: bool = False
    kv_cache_dtype: str = "auto"


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int = 256
    max_queued_requests: int = 4096
    chunked_prefill_size: int = 8192     # per-step token budget; <= 0 disables chunking
    schedule_policy: str = "fcfs"
    scheduler_recv_interval: int = 1
    delay_factor: float = 0.0            # vLLM's --scheduler-delay-factor (0: admit prompts at once)
    # schedule step k+1 while step k runs: None (the default) = on where the runner computes on a GPU (on
    # the CPU host work and compute share one thread: nothing to overlap, outputs would only come a step
    # later); True = on anywhere (--enable-overlap-schedule; tests); False = off
    overlap_schedule: Optional[bool] = None
    disable_overlap_schedule: bool = False   # SGLang's flag: overlap off (wins over overlap_schedule)


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding with a Gemma 4 assistant (MTP) drafter (SGLang's flags). Every algorithm name
    SGLang maps to it (NEXTN, EAGLE, MTP) means the same here: a chain of num_steps drafts per step."""
    algorithm: Optional[str] = None            # NEXTN | EAGLE | MTP
    draft_model_path: Optional[str] = None
    num_steps: int = 3
    num_draft_tokens: Optional[int] = None     # a chain: num_steps + 1
    eagle_topk: int = 1


@dataclass(frozen=True)
class EngineConfig:
    model_path: Optional[str] = None     # None: the built-in demo model
    served_model_name: Optional[str] = None
    tokenizer_path: Optional[str] = None
    dtype: str = "auto"                  # auto | bfloat16 | float16 | float32
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    load_format: str = "auto"            # auto | dummy
    context_length: Optional[int] = None
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    disable_cuda_graph: bool = False
    ple_on_host: bool = False            # E2B/E4B: keep the per-layer-embedding table in pinned host memory
    cuda_graph_max_bs: int = 160
    cuda_graph_max_tokens: int = 1024    # > 0: also graphs for steps with prompt tokens, up to this many tokens
    revision: Optional[str] = None
    runner: str = "auto"                 # auto (the model) | noop (fake tokens, no model: tests, benchmarks)

    def replace(self, **kw) -> "EngineConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = None
    enable_metrics: bool = False
    log_level: str = "info"
    reasoning_parser: Optional[str] = None      # "gemma4"
    tool_call_parser: Optional[str] = None      # "gemma4"
    chat_template: Optional[str] = None         # path overriding the checkpoint's template
    default_chat_template_kwargs: dict = field(default_factory=dict)
    max_request_bytes: int = 64 * 1024 * 1024
    force_include_usage: bool = False           # vLLM's --enable-force-include-usage: usage in every stream
    limit_mm_per_prompt: dict = field(default_factory=lambda: {"image": 16, "audio": 4, "video": 2})
    allow_private_media_urls: bool = False
    mm_processor_kwargs: dict = field(default_factory=dict)     # {"max_soft_tokens": 280}
    media_fetch_timeout: float = 10.0
    max_media_bytes: int = 20 * 2**20
