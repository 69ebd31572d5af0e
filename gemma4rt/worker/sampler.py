"""Batched sampling for one step: penalties, logit bias, suppressed and min-token-blocked ids,
grammar masks, temperature / top-k / top-p / min-p / greedy, per-request seeds, and logprobs of
the chosen and top-k tokens taken from the soft-capped distribution (before any penalty or
temperature)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from gemma4rt.ops import reference as ref
from gemma4rt.ops import sampling as ops_sampling
from gemma4rt.protocol import SamplingParams
from gemma4rt.worker.transfer import to_device


@dataclass
class SeqSamplingState:
    """Per-request sampling state kept by the worker across steps."""

    params: SamplingParams
    seed: int
    prompt_ids: list[int]
    output_counts: dict[int, int] = field(default_factory=dict)
    num_output: int = 0
    grammar: Optional[object] = None          # worker.constrained.SeqGrammar, when constrained
    think_open: bool = False                  # thinking budget: inside the thought channel,
    think_count: int = 0                      # with this many tokens in it so far

    def record(self, token_id: int) -> None:
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        self.num_output += 1
        p = self.params
        if p.thinking_budget is not None and len(p.thinking_tokens) == 2:
            if token_id == p.thinking_tokens[0]:
                self.think_open, self.think_count = True, 0
            elif token_id == p.thinking_tokens[1]:
                self.think_open = False
            elif self.think_open:
                self.think_count += 1

    def must_end_thinking(self) -> bool:
        """The thinking budget is spent inside an open thought channel: the next token is its end."""
        p = self.params
        return p.thinking_budget is not None and self.think_open and self.think_count >= p.thinking_budget


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: Optional[list[float]]
    top_logprobs: Optional[list[list[tuple[int, float]]]]


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...], sample_limit: Optional[int] = None,
                 never_ids: tuple[int, ...] = ()):
        """sample_limit: sample only ids below it; never_ids: ids never sampled. Both serve a stand-in
        tokenizer (see ModelRunner._stand_in_vocab); by default the whole vocabulary is sampled."""
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.sample_limit = sample_limit if sample_limit is not None and sample_limit < vocab_size else None
        self._never = [t for t in never_ids if 0 <= t < vocab_size]
        self._blocked: dict = {}       # device -> [V] bool mask of ids never sampled (built on first use)

    def _blocked_mask(self, dev) -> torch.Tensor:
        key = str(dev)
        if key not in self._blocked:
            m = torch.zeros(self.vocab_size, dtype=torch.bool)
            if self.sample_limit is not None:
                m[self.sample_limit:] = True
            m[self._never] = True
            self._blocked[key] = m.to(dev)
        return self._blocked[key]

    def _needs_penalties(self, p: SamplingParams) -> bool:
        return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0

    def sample(self, logits: torch.Tensor, states: list[SeqSamplingState],
               bitmask: Optional[torch.Tensor] = None, mask_rows: Optional[list[int]] = None) -> list[SampleResult]:
        """logits: [N, V] fp32, soft-capped; one row per state. bitmask / mask_rows: grammar masks
        (worker.constrained.GrammarSlots.fill) for the constrained rows. One result per row."""
        return self.results(self.sample_device(logits, states, bitmask, mask_rows), states)

    def sample_device(self, logits: torch.Tensor, states: list[SeqSamplingState],
                      bitmask: Optional[torch.Tensor] = None, mask_rows: Optional[list[int]] = None,
                      unseen: Optional[list[int]] = None) -> tuple:
        """The device part of sample(): (chosen ids [N], and the chosen ids' logprobs [N] and the top
        (values, ids) [N, k] when any state wants logprobs, else None), without a host sync.
        unseen[i]: outputs of row i's request not yet in its state's counts (sampled by a step still in
        flight with overlap scheduling, or the rows before it in a speculative verification chain): they count
        toward min_new_tokens and the seeded sampling step."""
        N, V = logits.shape
        dev = logits.device
        want_lp = any(s.params.logprobs or s.params.top_logprobs for s in states)
        raw = logits if want_lp else None
        # every edit below (penalties, bias, blocked ids, grammar masks) goes through edit(), which copies
        # the logits once, at the first edit: the caller's logits are never changed, and a batch without
        # any edit (plain decoding) samples them as they are
        work = logits

        def edit() -> torch.Tensor:
            nonlocal work
            if work is logits:
                work = logits.clone()
            return work
        # penalties, bias, suppression
        pen_rows = [i for i, s in enumerate(states) if self._needs_penalties(s.params)]
        if pen_rows:
            idx = torch.tensor(pen_rows, device=dev)
            counts = torch.zeros(len(pen_rows), V, dtype=torch.int32, device=dev)
            pmask = torch.zeros(len(pen_rows), V, dtype=torch.bool, device=dev)
            for j, i in enumerate(pen_rows):
                s = states[i]
                if s.output_counts:
                    ids = torch.tensor(list(s.output_counts.keys()), device=dev)
                    counts[j, ids] = torch.tensor(list(s.output_counts.values()), dtype=torch.int32, device=dev)
                if s.params.repetition_penalty != 1.0 and s.prompt_ids:
                    pmask[j, torch.tensor(s.prompt_ids, device=dev).clamp(0, V - 1)] = True
            sub = work[idx]             # a gathered copy; written back below
            ps = [states[i].params for i in pen_rows]
            ref.apply_penalties(sub,
                                counts, pmask,
                                torch.tensor([p.repetition_penalty for p in ps], device=dev),
                                torch.tensor([p.frequency_penalty for p in ps], device=dev),
                                torch.tensor([p.presence_penalty for p in ps], device=dev))
            edit()[idx] = sub
        # logit bias and blocked ids of every row as one scatter each (a per-row edit costs a few launches and
        # a host copy: ~0.2 ms a row for a 12B step of 100 rows, where every request suppresses EOI/EOA)
        forced = []                              # rows whose thinking budget is spent
        bias_rc: tuple[list[int], list[int]] = ([], [])
        bias_v: list[float] = []
        block_rc: tuple[list[int], list[int]] = ([], [])
        for i, s in enumerate(states):
            p = s.params
            if p.thinking_budget is not None and s.must_end_thinking():
                forced.append(i)
            for tid, b in (p.logit_bias or {}).items():
                if 0 <= int(tid) < V:
                    bias_rc[0].append(i)
                    bias_rc[1].append(int(tid))
                    bias_v.append(float(b))
            blocked = list(p.suppress_token_ids)
            n_out = s.num_output + (unseen[i] if unseen else 0)
            if n_out < p.min_new_tokens and s.grammar is None:     # a grammar decides its own end
                blocked += list(self.eos_token_ids) + list(p.stop_token_ids)
            for b in blocked:
                if 0 <= b < V:
                    block_rc[0].append(i)
                    block_rc[1].append(b)
        if bias_v:
            edit().index_put_(tuple(to_device(x, dev, torch.long) for x in bias_rc),
                              to_device(bias_v, dev, work.dtype), accumulate=True)
        if block_rc[0]:
            edit().index_put_(tuple(to_device(x, dev, torch.long) for x in block_rc),
                              torch.tensor(float("-inf"), dtype=work.dtype, device=dev))
        if self.sample_limit is not None or self._never:
            edit().masked_fill_(self._blocked_mask(dev), float("-inf"))
        if mask_rows:
            from gemma4rt.worker.grammar import apply_bitmask
            apply_bitmask(edit(), bitmask, mask_rows)
        for i in forced:                         # the thought channel's end, whatever else was allowed
            w = edit()
            w[i].fill_(float("-inf"))
            w[i, states[i].params.thinking_tokens[1]] = 0.0
        temps = to_device([s.params.temperature for s in states], dev, torch.float32)
        greedy_all = all(s.params.is_greedy() for s in states)
        if greedy_all:
            chosen = torch.argmax(work, dim=-1)
        else:
            top_k = to_device([s.params.top_k for s in states], dev, torch.long)
            top_p = to_device([s.params.top_p for s in states], dev, torch.float32)
            min_p = to_device([s.params.min_p for s in states], dev, torch.float32)
            temps = torch.where(to_device([s.params.is_greedy() for s in states], dev, torch.bool),
                                torch.zeros_like(temps), temps)
            seeds = to_device([s.seed for s in states], dev, torch.int64)
            steps = to_device([s.num_output + (unseen[i] if unseen else 0) for i, s in enumerate(states)], dev,
                              torch.int64)
            # one pass over the logits on the GPU (Philox noise keyed by (seed, step)); on the CPU
            # the reference with exponential noise from a generator seeded by (seed, step)
            chosen = ops_sampling.sample(work, temps, top_k, top_p, min_p, seeds, steps, None)
        lps = None
        if want_lp:
            lps = ref.logprobs_topk(raw, chosen, max(s.params.top_logprobs for s in states))
        return chosen, lps

    @staticmethod
    def results(sampled: tuple, states: list[SeqSamplingState]) -> list[SampleResult]:
        """sample_device()'s tensors (on the host or not) as one SampleResult per row."""
        chosen, lps = sampled
        chosen_list = chosen.tolist()
        results = []
        want_lp = lps is not None
        if want_lp:
            clp, tv, ti = (x.tolist() for x in lps)
        for i, s in enumerate(states):
            lp = tl = None
            if want_lp and (s.params.logprobs or s.params.top_logprobs):
                lp = [clp[i]]
                k = s.params.top_logprobs
                tl = [[(ti[i][j], tv[i][j]) for j in range(k)]] if k else None
            results.append(SampleResult([chosen_list[i]], lp, tl))
        return results


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Logprobs of the given next tokens under rows of (soft-capped) logits [n, V], plus top-k."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(next_ids, device=logits.device)
    chosen = lp[torch.arange(len(next_ids), device=logits.device), ids].tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in next_ids]
    if k > 0:
        v, i = torch.topk(lp, k, dim=-1)
        top = [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
    return chosen, top
