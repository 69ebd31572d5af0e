"""Grammar-constrained sampling in the worker: one GrammarMatcher per constrained request, one
token bitmask per step.

A request's grammar is compiled on a background thread as soon as the worker first sees the request
(`start`), so compilation overlaps its prefill; a request whose grammar is still compiling when it
is due to sample is deferred (the step is repeated for it later) instead of stalling the batch.
Each step, after the forward pass has been launched (the GPU runs it asynchronously), `fill` writes
the bitmask rows of the constrained requests on the CPU: the mask work overlaps the GPU forward
instead of adding to it. The sampler then applies the
mask to the logits (worker/grammar.apply_bitmask), and `accept` advances every matcher by the token
it got. Requests without a grammar cost nothing here.

xgrammar is imported only when the first constrained request arrives, so a worker without it still
serves every other request (a constrained request then ends with an error naming the cause).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, Optional, Sequence

import torch

from gemma4rt.protocol import GrammarSpec

log = logging.getLogger(__name__)


class SeqGrammar:
    """The grammar state of one request: a preparation future until it is done, then a matcher.

    `replay`: tokens this request generated before a preemption; the matcher accepts them again
    when it is built so a resumed request continues where it stopped."""

    def __init__(self, spec: GrammarSpec, future: Future, replay: Sequence[int]):
        self.spec = spec
        self.future = future
        self.matcher = None
        self.error: Optional[str] = None
        self._replay = list(replay)

    def poll(self, backend_of: Callable[[], Any]) -> Optional[bool]:
        """True: the matcher is ready; None: still compiling (never blocks); False: failed (`error`)."""
        if self.matcher is not None:
            return True
        if self.error is not None:
            return False
        if not self.future.done():
            return None
        try:
            compiled = self.future.result()
        except Exception as e:                  # GrammarError (bad spec), grammar support missing
            self.error = f"Invalid {self.spec.kind} constraint: {e}" if type(e).__name__ == "GrammarError" \
                else f"Structured output is unavailable on this worker: {e}"
            return False
        m = backend_of().matcher(self.spec, compiled)
        for t in self._replay:
            if not m.accept(t):
                self.error = "The tokens generated before a preemption do not fit the grammar."
                return False
        self._replay = []
        self.matcher = m
        return True


class GrammarSlots:
    """The worker's grammar backend and the step's bitmask.

    Everything slow happens on one background thread: building the backend (the tokenizer's
    vocabulary for xgrammar, once) and compiling each grammar (cached by spec). A request whose
    grammar is not ready when it is due to sample is deferred (its sampled token is dropped and the
    step repeated later), so a slow compile delays only that request, never the batch."""

    def __init__(self, make_tokenizer: Callable[[], Any], vocab_size: int, stop_token_ids: Sequence[int]):
        self._make_tokenizer = make_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.backend = None
        self._unavailable: Optional[str] = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._bitmask: Optional[torch.Tensor] = None

    def _backend(self):
        with self._lock:
            if self.backend is None and self._unavailable is None:
                try:
                    from gemma4rt.worker.grammar import GrammarBackend
                    self.backend = GrammarBackend(self._make_tokenizer(), vocab_size=self.vocab_size,
                                                  stop_token_ids=self.stop_token_ids)
                except Exception as e:           # xgrammar missing, tokenizer unreadable
                    self._unavailable = str(e)
                    log.error("structured output is unavailable on this worker: %s", e)
            if self.backend is None:
                raise RuntimeError(self._unavailable)
            return self.backend

    def _prepare(self, spec: GrammarSpec):
        backend = self._backend()
        compiled = backend.compile(spec)
        backend.kind_words(spec.kind)             # the per-kind mask, computed once
        return compiled

    def start(self, spec: GrammarSpec, replay: Sequence[int]) -> SeqGrammar:
        return SeqGrammar(spec, self._pool.submit(self._prepare, spec), replay)

    def fill(self, grammars: list[Optional[SeqGrammar]]
             ) -> tuple[Optional[torch.Tensor], list[int], dict[int, str], set[int]]:
        """Bitmask rows for the sampled rows whose request is constrained (row i <-> grammars[i]).
        Returns (bitmask or None, rows with an active mask, {row: error}, rows still compiling)."""
        rows: list[int] = []
        errors: dict[int, str] = {}
        pending: set[int] = set()
        if not any(g is not None for g in grammars):
            return None, rows, errors, pending
        if all(g is not None and g.matcher is None and g.error is None for g in grammars):
            # nothing else to sample: wait a little rather than spin through repeated steps
            futures_wait([g.future for g in grammars], timeout=0.02, return_when=FIRST_COMPLETED)
        for i, g in enumerate(grammars):
            if g is None:
                continue
            state = g.poll(lambda: self.backend)
            if state is None:
                pending.add(i)
                continue
            if state is False:
                errors[i] = g.error
                continue
            n = len(grammars)
            if self._bitmask is None or self._bitmask.shape[0] < n:
                from gemma4rt.worker.grammar import allocate_bitmask
                self._bitmask = allocate_bitmask(max(n, 8), self.backend.vocab_size)
                if torch.cuda.is_available():
                    self._bitmask = self._bitmask.pin_memory()
            if g.matcher.fill_bitmask(self._bitmask, i):
                rows.append(i)
        return self._bitmask, rows, errors, pending

    @staticmethod
    def accept(g: SeqGrammar, token_id: int) -> Optional[str]:
        """Advance by the sampled token; an error message when the grammar rejects it (it can only
        happen when every allowed token had zero probability, e.g. a logit_bias of -100)."""
        if g.matcher.accept(token_id):
            return None
        return f"The sampled token {token_id} does not fit the {g.spec.kind} constraint."
