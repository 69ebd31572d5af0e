"""Every message that crosses an actor boundary (front door <-> scheduler <-> workers).

Read this file first. Messages are msgspec Structs: in one process they travel as Python objects,
between processes as msgspec frames (runtime/mailbox.py). Tensors never cross processes; token ids do,
once per step, batched for all requests.

Flow: FrontDoor --AddRequest/AbortRequest--> Scheduler --StepPlan--> Worker(s)
      Worker(rank 0) --StepResult--> Scheduler --TokenOutputs--> FrontDoor
"""
from __future__ import annotations

from typing import Optional

import msgspec

# ----------------------------------------------------------------------------------------------
# Request-level parameters
# ----------------------------------------------------------------------------------------------


class GrammarSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A constraint on the generated text, compiled by the worker's grammar backend.

    kind: "json_schema" | "json_object" | "regex" | "ebnf" | "tool_call"; value: the schema JSON
    text / regex / grammar text / tool list (worker/grammar.py). If `after_token_ids` is non-empty, the constraint applies only once
    one of these token ids has been generated (e.g. the end of the reasoning channel)."""

    kind: str
    value: str = ""
    after_token_ids: list[int] = []


class SamplingParams(msgspec.Struct, kw_only=True):
    """How to pick tokens for one sequence. Defaults follow the OpenAI API; the front door fills
    unset fields from the checkpoint's generation_config.json."""

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1                   # <= 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # 1 = off (multiplicative, prompt + output tokens)
    frequency_penalty: float = 0.0    # additive, output tokens
    presence_penalty: float = 0.0     # additive, output tokens
    seed: Optional[int] = None        # same seed + same prompt -> same output
    stop_token_ids: list[int] = []    # extra stop ids (besides the model's EOS ids)
    ignore_eos: bool = False
    logprobs: bool = False            # logprob of each chosen token (after the soft-cap)
    top_logprobs: int = 0             # and of the k most likely tokens
    prompt_logprobs: bool = False     # logprobs of the prompt tokens (completions `echo`)
    logit_bias: Optional[dict[int, float]] = None
    suppress_token_ids: list[int] = []  # never sampled (unified 12B: EOI/EOA)
    grammar: Optional[GrammarSpec] = None
    # vLLM's thinking_token_budget: at most this many tokens inside the thought channel, then its end is
    # forced; thinking_tokens = [channel start id, channel end id] (from the front door's tokenizer)
    thinking_budget: Optional[int] = None
    thinking_tokens: list[int] = []

    def is_greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


class MultimodalItem(msgspec.Struct, kw_only=True):
    """One image / audio clip / video frame of a prompt, already preprocessed by the front door.

    `offset`: index in prompt_token_ids of its first soft-token placeholder; `num_tokens`: how many
    placeholders it fills. `content_hash`: a stable hash of the media (prefix-cache key, encoder
    cache key). `data`: preprocessed arrays as raw bytes with dtype/shape, keyed by name."""

    modality: str                      # "image" | "audio" | "video"
    offset: int
    num_tokens: int
    content_hash: str
    bidirectional: bool = False        # image/video block attends to itself on sliding layers
    arrays: dict[str, tuple[str, list[int], bytes]] = {}   # name -> (dtype, shape, raw bytes)


# ----------------------------------------------------------------------------------------------
# FrontDoor -> Scheduler
# ----------------------------------------------------------------------------------------------


class AddRequest(msgspec.Struct, kw_only=True):
    rid: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    mm_items: list[MultimodalItem] = []
    arrival_time: float = 0.0


class AbortRequest(msgspec.Struct, kw_only=True):
    rid: str


class FlushCache(msgspec.Struct, kw_only=True):
    pass


class Shutdown(msgspec.Struct, kw_only=True):
    reason: str = ""


# ----------------------------------------------------------------------------------------------
# Scheduler -> Worker
# ----------------------------------------------------------------------------------------------


class NewRequestData(msgspec.Struct, kw_only=True):
    """A request the worker has not seen (or sees again after preemption): everything it needs.

    token_ids: the full known sequence (prompt, plus tokens generated before a preemption).
    pages: page table per pool name ("sliding", "full"); -1 marks logical pages that are not
    allocated (slid out of the window, or never needed)."""

    rid: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    pages: dict[str, list[int]]
    mm_items: list[MultimodalItem] = []
    num_output_tokens: int = 0        # tokens of token_ids already generated (resumed requests)


class ScheduledRequest(msgspec.Struct, kw_only=True, array_like=True):
    """One request's share of a step: run tokens [start, start + num_tokens) of its sequence.

    new_pages: pages appended to its page table per pool before this step.
    sample: whether to sample after the last token (False for a non-final prefill chunk).
    draft_token_ids: speculative tokens appended after the known sequence, to be verified."""

    rid: str
    start: int
    num_tokens: int
    new_pages: dict[str, list[int]]
    sample: bool
    draft_token_ids: list[int] = []


class StepPlan(msgspec.Struct, kw_only=True):
    step_id: int
    new_requests: list[NewRequestData]
    scheduled: list[ScheduledRequest]
    removed_rids: list[str]           # finished, aborted or preempted since the last plan


# ----------------------------------------------------------------------------------------------
# Worker -> Scheduler
# ----------------------------------------------------------------------------------------------


class SampledTokens(msgspec.Struct, kw_only=True, array_like=True):
    """What one request got this step. token_ids: accepted tokens (one, or several with
    speculative decoding). logprobs / top_logprobs parallel to token_ids when requested;
    top_logprobs[i] is a list of (token_id, logprob). prompt_logprobs: for requests that asked,
    the logprobs of the prompt tokens computed in this step (first token has none)."""

    rid: str
    token_ids: list[int]
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    prompt_logprobs: Optional[list[Optional[float]]] = None
    prompt_top_logprobs: Optional[list[Optional[list[tuple[int, float]]]]] = None
    error: Optional[str] = None       # this request failed (e.g. its grammar did not compile)
    deferred: bool = False            # no token this step (its grammar is still compiling): the
                                      # scheduler repeats the step's last position later
    next_draft_ids: list[int] = []    # speculative decoding: drafts to verify after token_ids next step


class StepResult(msgspec.Struct, kw_only=True):
    step_id: int
    sampled: list[SampledTokens]
    error: Optional[str] = None


# ----------------------------------------------------------------------------------------------
# Scheduler -> FrontDoor
# ----------------------------------------------------------------------------------------------


class RequestOutput(msgspec.Struct, kw_only=True, array_like=True):
    """New tokens of one request since the last TokenOutputs. finish_reason: None while running,
    else "stop" | "length" | "abort" | "error". matched_stop: the stop token id that ended it."""

    rid: str
    new_token_ids: list[int]
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    prompt_logprobs: Optional[list[Optional[float]]] = None
    prompt_top_logprobs: Optional[list[Optional[list[tuple[int, float]]]]] = None
    finish_reason: Optional[str] = None
    matched_stop: Optional[int] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: Optional[str] = None


class TokenOutputs(msgspec.Struct, kw_only=True):
    outputs: list[RequestOutput]


class SchedulerStats(msgspec.Struct, kw_only=True):
    """Periodic load figures for /metrics and /health."""

    num_running: int
    num_waiting: int
    pool_usage: dict[str, float]          # pool name -> fraction of pages in use
    pool_pages: dict[str, int]            # pool name -> total pages
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    num_preemptions: int = 0
    healthy: bool = True
    spec_verifications: int = 0           # speculative decoding: request rows verified so far
    spec_accepted: int = 0                # drafts accepted so far (tokens per verification: 1 + this / rows)


class WorkerFailed(msgspec.Struct, kw_only=True):
    rank: int
    reason: str


class EngineReady(msgspec.Struct, kw_only=True):
    """Engine process -> main process, once the model is loaded and the KV pools exist."""

    model_info: dict                       # config.ModelInfo as a dict (msgspec.structs/asdict)
    pool_pages: dict[str, int]             # pool name -> pages
    pool_page_size: dict[str, int]         # pool name -> tokens per page
    tokenizer_path: str
    pid: int = 0


MESSAGE_TYPES = (
    AddRequest, AbortRequest, FlushCache, Shutdown, StepPlan, StepResult, TokenOutputs,
    SchedulerStats, WorkerFailed, EngineReady,
)
