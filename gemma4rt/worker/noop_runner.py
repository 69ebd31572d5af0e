"""NoopRunner: the ModelRunner interface without a model, for scheduler tests, server tests and the
host-overhead benchmark.

Tokens are a deterministic function of the sequence (greedy, or seed-driven when a seed is given),
so outputs are reproducible across prefix-cache hits and preemptions. With `check=True` it simulates
the KV cache: every written slot remembers (position, token) and every query reads back the slots it
would attend to (all earlier positions on full pools, the window on sliding pools) and asserts they
hold this request's tokens, which catches any page-sharing or prefix-cache mistake of the scheduler.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

from gemma4rt.config import EngineConfig, ModelInfo, PoolSpec
from gemma4rt.protocol import SampledTokens, StepPlan, StepResult

EOS_IDS = (1, 106, 50)
_SPECIAL = {0, 1, 2, 3, 4, 46, 47, 48, 49, 50, 51, 52, 98, 100, 101, 105, 106} | set(range(500, 512))
TOKENS = [i for i in range(5, 500) if i not in _SPECIAL]
_M = (1 << 61) - 1


def _mix(*xs: int) -> int:
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (x & _M)) * 1099511628211) & _M
    return h


def noop_tokenizer_path() -> str:
    """The tiny byte-level tokenizer (with the Gemma 4 chat template), written once to a cache dir."""
    root = Path(os.environ.get("GEMMA4RT_CACHE") or Path.home() / ".cache" / "gemma4rt").expanduser()
    out = root / "noop-tokenizer-v1"
    if not (out / "tokenizer.json").is_file():
        import tempfile
        from gemma4rt.tools.tiny_tokenizer import save_tiny_tokenizer
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".noop-tok-", dir=root))
        save_tiny_tokenizer(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            pass
    return str(out)


class NoopRunner:
    def __init__(self, engine_cfg: Optional[EngineConfig] = None, *, sliding_window: Optional[int] = 32,
                 check: bool = False, num_sliding_pages: Optional[int] = None):
        cfg = engine_cfg or EngineConfig()
        self.engine_cfg = cfg
        ps = cfg.cache.page_size
        ctx = cfg.context_length or 4096
        total = cfg.cache.max_total_tokens or 16384
        n_full = max(1, total // ps)
        self.pool_specs: list[PoolSpec] = [PoolSpec(name="full", num_pages=n_full, page_size=ps)]
        if sliding_window:
            self.pool_specs.append(PoolSpec(name="sliding", num_pages=num_sliding_pages or n_full,
                                            page_size=ps, sliding_window=sliding_window))
        self.model_info = ModelInfo(
            name=cfg.served_model_name or cfg.model_path or "gemma4rt-noop",
            model_path=cfg.model_path or "", context_length=ctx, vocab_size=512,
            eos_token_ids=EOS_IDS, bos_token_id=2, pad_token_id=0,
            generation_defaults={})
        self._tok = cfg.tokenizer_path
        self.check = check
        self.seqs: dict[str, dict] = {}
        self.kv: dict[str, dict[int, list]] = {s.name: {} for s in self.pool_specs}
        self.specs = {s.name: s for s in self.pool_specs}
        self.num_steps = 0
        self.num_tokens = 0

    @property
    def tokenizer_path(self) -> str:
        if self._tok is None:
            self._tok = noop_tokenizer_path()
        return self._tok

    # --------------------------------------------------------------------------------------------
    def next_token(self, seq: list[int], sampling, step_salt: int) -> int:
        n = len(seq)
        a = seq[-1] if n else 0
        b = seq[-2] if n > 1 else 0
        if sampling.is_greedy():
            h = _mix(a, b, n)
        elif sampling.seed is not None:
            h = _mix(a, b, n, sampling.seed + 7)
        else:
            h = _mix(a, b, n, step_salt)
        return TOKENS[h % len(TOKENS)]

    def execute(self, plan: StepPlan) -> StepResult:
        self.num_steps += 1
        for rid in plan.removed_rids:
            self.seqs.pop(rid, None)
        for nr in plan.new_requests:
            assert nr.rid not in self.seqs, f"new request {nr.rid} is already known"
            self.seqs[nr.rid] = {"tokens": list(nr.token_ids), "pages": {k: list(v) for k, v in nr.pages.items()},
                                 "sampling": nr.sampling, "num_prompt": nr.num_prompt_tokens}
        out = []
        salt = random.getrandbits(60)
        for sr in plan.scheduled:
            s = self.seqs[sr.rid]
            for k, v in sr.new_pages.items():
                s["pages"].setdefault(k, []).extend(v)
            toks = s["tokens"]
            end = sr.start + sr.num_tokens
            assert 0 <= sr.start and end <= len(toks), (sr, len(toks))
            self.num_tokens += sr.num_tokens
            if self.check:
                self._check(sr.rid, s, sr.start, end)
            if not sr.sample:
                continue
            sp = s["sampling"]
            t = self.next_token(toks[:end], sp, salt)
            toks.append(t)
            st = SampledTokens(rid=sr.rid, token_ids=[t])
            if sp.logprobs or sp.top_logprobs:
                lp = -((_mix(t, end) % 1000) / 1000.0) - 0.01
                st.logprobs = [lp]
                if sp.top_logprobs:
                    alts = [TOKENS[(TOKENS.index(t) + j) % len(TOKENS)] for j in range(sp.top_logprobs)]
                    st.top_logprobs = [[(x, lp - j) for j, x in enumerate(alts)]]
            if sp.prompt_logprobs:
                st.prompt_logprobs = [None] + [-0.5] * (s["num_prompt"] - 1)
                st.prompt_top_logprobs = [None] + [[(x, -0.5)] for x in toks[1:s["num_prompt"]]]
            out.append(st)
        return StepResult(step_id=plan.step_id, sampled=out)

    def launch(self, plan: StepPlan) -> StepResult:
        """Overlap scheduling: the step runs at once (its tokens are known before the next plan needs
        them); the engine gets the finished StepResult, whose processing the scheduler still lags by one
        step (so the scheduler's overlap logic runs as with a GPU)."""
        return self.execute(plan)

    # --------------------------------------------------------------------------------------------
    def _check(self, rid: str, s: dict, start: int, end: int) -> None:
        toks = s["tokens"]
        for name, spec in self.specs.items():
            ps = spec.page_size
            table = s["pages"].get(name, [])
            store = self.kv[name]
            for pos in range(start, end):
                j = pos // ps
                assert j < len(table) and table[j] >= 0, f"{rid}: no {name} page for position {pos}"
                store.setdefault(table[j], [None] * ps)[pos % ps] = (pos, toks[pos])
            lo = 0 if spec.sliding_window is None else max(0, start - spec.sliding_window + 1)
            for pos in range(lo, end):
                page = table[pos // ps]
                assert page >= 0, f"{rid}: {name} page for position {pos} (window start {lo}) missing"
                got = store.get(page, [None] * ps)[pos % ps]
                assert got == (pos, toks[pos]), f"{rid}: {name} page {page} slot {pos % ps} holds {got}, want {(pos, toks[pos])}"
