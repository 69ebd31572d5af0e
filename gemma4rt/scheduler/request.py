"""One request's state inside the scheduler."""
from __future__ import annotations

import enum
from typing import Optional

from gemma4rt.protocol import AddRequest, MultimodalItem, SamplingParams


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Request:
    """token_ids is the known sequence (prompt + generated). num_computed tokens have their KV
    in the cache. pages[pool] is the page table (logical page -> page id, -1 = not held)."""

    __slots__ = (
        "rid", "token_ids", "num_prompt_tokens", "sampling", "mm_items", "arrival_time", "status",
        "num_computed", "pages", "num_sent_pages", "known_to_worker", "num_cached_tokens",
        "stop_ids", "finish_reason", "matched_stop", "error", "draft_token_ids", "keys",
        "mm_spans", "bidi_spans", "order", "num_registered", "slide_lo", "ever_admitted", "cap", "slide_check", "pages_dirty",
        "pending", "hold", "grammar_ready",
    )

    def __init__(self, req: AddRequest, stop_ids: frozenset, order: int):
        self.rid = req.rid
        self.token_ids: list[int] = list(req.prompt_token_ids)
        self.num_prompt_tokens = len(req.prompt_token_ids)
        self.sampling: SamplingParams = req.sampling
        self.mm_items: list[MultimodalItem] = list(req.mm_items)
        self.arrival_time = req.arrival_time
        self.status = Status.WAITING
        self.num_computed = 0
        self.pages: dict[str, list[int]] = {}
        self.num_sent_pages: dict[str, int] = {}
        self.known_to_worker = False
        self.num_cached_tokens = 0
        self.stop_ids = stop_ids
        self.finish_reason: Optional[str] = None
        self.matched_stop: Optional[int] = None
        self.error: Optional[str] = None
        self.draft_token_ids: list[int] = []
        self.keys: list[tuple] = []                  # prefix keys of full pages computed so far
        self.num_registered = 0                      # leading full pages registered in the cache
        self.mm_spans = [(m.offset, m.offset + m.num_tokens, m.content_hash) for m in self.mm_items]
        self.bidi_spans = [(m.offset, m.offset + m.num_tokens) for m in self.mm_items if m.bidirectional]
        self.order = order                           # admission order (newest = largest)
        self.slide_lo: dict[str, int] = {}          # sliding pools: logical pages below are released
        self.ever_admitted = False
        self.cap = 0                  # tokens every pool's page table covers (a lower bound)
        self.slide_check = 0          # num_computed from which a sliding page may leave the window
        self.pages_dirty = False      # pages appended since the last plan
        # overlap scheduling: positions of tokens sampled by steps in flight (placeholders in token_ids),
        # and whether the request waits for them before its next step
        self.pending: list[int] = []
        self.hold = False
        # overlap: a token came back for its grammar, so the worker's copy of the grammar is compiled and
        # no later step of this request can be deferred (until a preemption re-adds it to the worker)
        self.grammar_ready = False

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_computed >= len(self.token_ids) - 1

    def reset_for_recompute(self) -> None:
        self.num_computed = 0
        self.pages = {}
        self.num_sent_pages = {}
        self.known_to_worker = False
        self.num_registered = 0
        self.slide_lo = {}
        self.cap = 0
        self.slide_check = 0
        self.pages_dirty = False
        self.draft_token_ids = []
        self.grammar_ready = False
        self.status = Status.WAITING
