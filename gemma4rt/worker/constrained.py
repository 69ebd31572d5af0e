"""Grammar-constrained sampling in the worker: one GrammarMatcher per constrained request, one
token bitmask per step.

A request's grammar is compiled on a background thread as soon as the worker first sees the request
(`start`), so compilation overlaps its prefill. Each step, after the forward pass has been launched
(the GPU runs it asynchronously), `fill` writes the bitmask rows of the constrained requests on the
CPU: the mask work overlaps the GPU forward instead of adding to it. The sampler then applies the
mask to the logits (worker/grammar.apply_bitmask), and `accept` advances every matcher by the token
it got. Requests without a grammar cost nothing here.

xgrammar is imported only when the first constrained request arrives, so a worker without it still
serves every other request (a constrained request then ends with an error naming the cause).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any, Callable, Optional, Sequence

import torch

from gemma4rt.protocol import GrammarSpec

log = logging.getLogger(__name__)


class SeqGrammar:
    """The grammar state of one request: a compile future until the first fill, then a matcher.

    `replay`: tokens this request generated before a preemption; the matcher accepts them again
    when it is built so a resumed request continues where it stopped."""

    def __init__(self, spec: GrammarSpec, future: Optional[Future], error: Optional[str],
                 replay: Sequence[int]):
        self.spec = spec
        self.future = future
        self.matcher = None
        self.error = error
        self._replay = list(replay)

    def ready(self, backend: Any) -> bool:
        """Build the matcher (waits for the compile). False with `error` set when it failed."""
        if self.matcher is not None:
            return True
        if self.error is not None:
            return False
        try:
            compiled = self.future.result()
        except Exception as e:                  # GrammarError: bad schema / grammar
            self.error = f"Invalid {self.spec.kind} constraint: {e}"
            return False
        m = backend.matcher(self.spec, compiled)
        for t in self._replay:
            if not m.accept(t):
                self.error = "The tokens generated before a preemption do not fit the grammar."
                return False
        self._replay = []
        self.matcher = m
        return True


class GrammarSlots:
    """The worker's grammar backend (built lazily from the tokenizer) and the step's bitmask."""

    def __init__(self, make_tokenizer: Callable[[], Any], vocab_size: int, stop_token_ids: Sequence[int]):
        self._make_tokenizer = make_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.backend = None
        self._unavailable: Optional[str] = None
        self._bitmask: Optional[torch.Tensor] = None

    def _get_backend(self):
        if self.backend is None and self._unavailable is None:
            try:
                from gemma4rt.worker.grammar import GrammarBackend
                self.backend = GrammarBackend(self._make_tokenizer(), vocab_size=self.vocab_size,
                                              stop_token_ids=self.stop_token_ids)
            except Exception as e:               # xgrammar missing, tokenizer unreadable
                self._unavailable = f"structured output is unavailable on this worker: {e}"
                log.error("%s", self._unavailable)
        return self.backend

    def start(self, spec: GrammarSpec, replay: Sequence[int]) -> SeqGrammar:
        backend = self._get_backend()
        if backend is None:
            return SeqGrammar(spec, None, self._unavailable, replay)
        return SeqGrammar(spec, backend.compile_async(spec), None, replay)

    def fill(self, grammars: list[Optional[SeqGrammar]]) -> tuple[Optional[torch.Tensor], list[int], dict[int, str]]:
        """Bitmask rows for the sampled rows whose request is constrained (row i <-> grammars[i]).
        Returns (bitmask or None, rows with an active mask, {row: error})."""
        rows: list[int] = []
        errors: dict[int, str] = {}
        if not any(g is not None for g in grammars):
            return None, rows, errors
        n = len(grammars)
        if self._bitmask is None or self._bitmask.shape[0] < n:
            from gemma4rt.worker.grammar import allocate_bitmask
            self._bitmask = allocate_bitmask(max(n, 8), self.backend.vocab_size)
            if torch.cuda.is_available():
                self._bitmask = self._bitmask.pin_memory()
        for i, g in enumerate(grammars):
            if g is None:
                continue
            if not g.ready(self.backend):
                errors[i] = g.error
                continue
            if g.matcher.fill_bitmask(self._bitmask, i):
                rows.append(i)
        return self._bitmask, rows, errors

    @staticmethod
    def accept(g: SeqGrammar, token_id: int) -> Optional[str]:
        """Advance by the sampled token; an error message when the grammar rejects it (it can only
        happen when every allowed token had zero probability, e.g. a logit_bias of -100)."""
        if g.matcher.accept(token_id):
            return None
        return f"The sampled token {token_id} does not fit the {g.spec.kind} constraint."
