"""Speculative decoding in the worker: verification of a request's chain of drafts against the target's
rows, and the next chain from the drafter (gemma4rt/spec/drafter.py). Mixed into ModelRunner."""
from __future__ import annotations

import logging

import torch

from gemma4rt.model.context import ForwardContext
from gemma4rt.worker.sampler import Sampler
from gemma4rt.worker.transfer import to_device

log = logging.getLogger(__name__)


class _Tables:
    """The page tables of a step run through a graph (all _draft_next needs of its context)."""

    def __init__(self, page_tables: dict):
        self.page_tables = page_tables


class SpeculativeMixin:
    """ModelRunner's speculative-decoding methods (they use its seqs, sampler, model, graphs and the step's
    context and hidden rows that _forward keeps when a drafter is loaded)."""

    def _load_drafter(self, engine_cfg) -> None:
        """The drafter of --speculative-draft-model-path (before the KV pools: their budget is what the weights
        leave); none without it."""
        self.drafter, self.spec_steps = None, 0
        self.spec_drafted = self.spec_accepted = self.spec_verify_rows = 0   # drafts verified / accepted
        self._step_ctx = self._step_hidden = None    # the eager step's context and final hidden rows
        spec = engine_cfg.speculative
        if not spec.draft_model_path:
            return
        if self.tp.size > 1:
            raise ValueError("speculative decoding runs with --tp 1 only")
        from gemma4rt.spec.drafter import load_drafter
        self.drafter = load_drafter(spec.draft_model_path, self.config.text, self.dtype, self.device,
                                    engine_cfg.load_format, engine_cfg.seed)
        self.spec_steps = spec.num_steps
        log.info("speculative decoding: drafter %s, %d drafts per step", spec.draft_model_path, self.spec_steps)

    def _spec_ok(self, seq) -> bool:
        """Whether this request decodes speculatively: anything but penalties and grammars, whose state
        after each accepted draft the verification rows would need."""
        st = seq.sampling
        return (self.drafter is not None and st.grammar is None and not self.sampler._needs_penalties(st.params)
                and st.params.thinking_budget is None)

    def _verify(self, scheduled, logits: torch.Tensor, verify: list, out: list) -> dict[int, int]:
        """Verification of a chain of drafts: at each of a request's rows (the known token, then each draft)
        the target makes the choice a plain step would make there — the same sampler, with the seeded noise
        of that output position (greedy: the argmax) — all in one pass; drafts are accepted while they equal
        it, and the first differing choice (or the one after the last draft) follows. The tokens (and
        log-probabilities) are therefore exactly those of plain decoding; a draft is accepted with the
        target's probability of it, as in speculative sampling with a one-token draft distribution.
        Returns {request index: drafts accepted}."""
        rows, states, offsets = [], [], []
        for i, first, n in verify:
            rows.extend(range(first, first + n))
            states.extend([self.seqs[scheduled[i].rid].sampling] * n)
            offsets.extend(range(n))                    # row j chooses output num_output + j
        chosen = Sampler.results(self.sampler.sample_device(logits[to_device(rows, logits.device, torch.long)],
                                                            states, unseen=offsets), states)
        k = 0
        accepted = {}
        for i, first, n in verify:
            sr = scheduled[i]
            res = chosen[k:k + n]
            got = [r.token_ids[0] for r in res]
            k += n
            d = sr.draft_token_ids
            a = 0
            while a < len(d) and got[a] == d[a]:
                a += 1
            st = out[i]
            st.token_ids = list(d[:a]) + [got[a]]
            if res[0].logprobs is not None:
                st.logprobs = [r.logprobs[0] for r in res[:a + 1]]
            if res[0].top_logprobs is not None:
                st.top_logprobs = [r.top_logprobs[0] for r in res[:a + 1]]
            accepted[i] = a
            self.spec_drafted += len(d)
            self.spec_accepted += a
            self.spec_verify_rows += 1
            seq = self.seqs[sr.rid]
            for t in st.token_ids:
                seq.token_ids.append(t)
                seq.sampling.record(t)
        return accepted

    def _draft_next(self, scheduled, rows, accepted: dict[int, int], out: list) -> None:
        """Drafts for the next step of every speculative request that got a token now, from its newest
        token and the target's hidden state that produced it (SampledTokens.next_draft_ids); accepted:
        drafts accepted per verified request (its hidden row is the one after them)."""
        idx, hrows, toks, pos = [], [], [], []
        for i, (sr, (first, n)) in enumerate(zip(scheduled, rows)):
            st = out[i]
            seq = self.seqs[sr.rid]
            if not st.token_ids or st.error or not self._spec_ok(seq):
                continue
            idx.append(i)
            hrows.append(first + (accepted[i] if i in accepted else n - 1))
            toks.append(st.token_ids[-1])
            pos.append(len(seq.token_ids) - 1)
        if not idx:
            return
        dev = self.device
        ctx = self._step_ctx
        sel = to_device(idx, dev, torch.long)
        p = to_device(pos, dev, torch.long)
        B = len(idx)
        dctx = ForwardContext(
            input_ids=to_device(toks, dev, torch.long), positions=p,
            cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=dev), seq_lens=p.to(torch.int32),
            page_tables={k: v[sel] for k, v in ctx.page_tables.items()},
            slot_mappings={k: torch.full((B,), -1, dtype=torch.long, device=dev) for k in ctx.page_tables},
            kv=self.kv, logits_indices=torch.arange(B, dtype=torch.long, device=dev), allow_shared_layer_skip=False)
        lm = self.model.language_model
        hidden = self._step_hidden[to_device(hrows, dev, torch.long)]
        drafts = None
        if self.graphs is not None:
            drafts = self.graphs.run_draft(dctx.input_ids, hidden, p, dctx.page_tables)
        if drafts is None:
            drafts = self.drafter.draft(dctx, dctx.input_ids, hidden, lm.embed_tokens.weight, lm.embed_scale(),
                                        self.spec_steps, self.sampler.sample_limit)
        drafts = drafts.tolist()
        for i, d in zip(idx, drafts):
            out[i].next_draft_ids = d
