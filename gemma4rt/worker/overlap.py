"""Overlap scheduling in the worker (the default on a GPU): ModelRunner.launch() runs a step and its
sampling without waiting for the device, collect() waits for the sampled tokens. A step launched before the
previous one's tokens reached the host reads them on the device (_missing_tokens)."""
from __future__ import annotations

from typing import Optional

import torch

from gemma4rt.protocol import SampledTokens, ScheduledRequest, StepPlan, StepResult
from gemma4rt.worker.sampler import Sampler
from gemma4rt.worker.transfer import to_device


class _Launched:
    """A step launched by ModelRunner.launch(): its finished StepResult, or what collect() needs."""

    def __init__(self, result: Optional[StepResult] = None, step_id: int = 0, scheduled=(), errors=(), idx=(),
                 states=(), seqs=(), host=None, has_lp: bool = False, t_start=None):
        self.result, self.step_id, self.scheduled, self.errors = result, step_id, scheduled, list(errors)
        self.idx, self.states, self.seqs, self.host, self.has_lp = idx, states, seqs, host, has_lp
        self.t_start = t_start          # a timing event recorded before the step's first launch (CUDA)


def _to_host(tensors: tuple) -> tuple[tuple, Optional[torch.cuda.Event]]:
    """Copies of device tensors in pinned host memory, started without waiting, and an event to wait on
    (a timing event: it also ends the step's device time)."""
    if tensors[0].device.type != "cuda":
        return tuple(t.cpu() for t in tensors), None
    out = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors)
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return out, ev


class OverlapMixin:
    """ModelRunner's overlap-scheduling methods (they use its seqs, sampler, _forward and _sample)."""

    last_step_gpu_ms = None     # the device time of the last step collected (the engine's step log shows it)

    def _timing_event(self) -> Optional[torch.cuda.Event]:
        """A timing event recorded now on the current stream (None off CUDA): the start of a step's device time."""
        if getattr(self, "device", None) is None or self.device.type != "cuda":
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _missing_tokens(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(rows of this step's input ids, their tokens) for the inputs sampled by the step in flight."""
        if not self._step_missing:
            return None
        toks, row_of = self._last_sampled
        dst = to_device([r for r, _ in self._step_missing], self.device, torch.long)
        return dst, toks[to_device([row_of[rid] for _, rid in self._step_missing], self.device, torch.long)]

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> "_Launched":
        """Overlap scheduling: run the step and its sampling without waiting for
        the device; collect() returns its StepResult. A decode row may take as input the token the previous
        launched step sampled, not yet copied to the host: it is read on the device. Steps whose sampling
        needs the host (grammar masks, repetition penalties, prompt logprobs) run to the end here."""
        if self.tp.size > 1:
            raise RuntimeError("overlap scheduling needs --tp 1")
        t_start = self._timing_event()
        scheduled, errors, logits, rows = self._forward(plan)
        missing = {rid for _, rid in self._step_missing}
        self._last_sampled = None
        if logits is None:
            return _Launched(result=StepResult(step_id=plan.step_id, sampled=errors))
        if any(self._host_sampling(sr, self.seqs[sr.rid]) for sr in scheduled):
            if self._open is not None:       # its tokens first: _sample appends this step's after them
                self.collect(self._open)
            return _Launched(result=StepResult(step_id=plan.step_id,
                                               sampled=self._sample(scheduled, logits, rows) + errors))
        idx = [i for i, sr in enumerate(scheduled) if sr.sample]
        sample_rows = [rows[i][0] + rows[i][1] - 1 for i in idx]
        states = [self.seqs[scheduled[i].rid].sampling for i in idx]
        device_out = None
        if idx:
            picked = logits if sample_rows == list(range(logits.shape[0])) else \
                logits[to_device(sample_rows, logits.device, torch.long)]
            chosen, lps = self.sampler.sample_device(
                picked, states, unseen=[1 if scheduled[i].rid in missing else 0 for i in idx])
            self._last_sampled = (chosen, {scheduled[i].rid: j for j, i in enumerate(idx)})
            device_out = (chosen,) + (tuple(lps) if lps is not None else ())
        h = _Launched(step_id=plan.step_id, scheduled=scheduled, errors=errors, idx=idx, states=states,
                      seqs=[self.seqs[scheduled[i].rid] for i in idx],
                      host=_to_host(device_out) if device_out else None, has_lp=idx != [] and lps is not None,
                      t_start=t_start)
        self._open = h
        return h

    def collect(self, h: "_Launched") -> StepResult:
        """The StepResult of a launched step (waits for its sampled tokens, appends them to the requests)."""
        if h.result is not None:
            return h.result
        if self._open is h:
            self._open = None
        out = [SampledTokens(rid=sr.rid, token_ids=[]) for sr in h.scheduled]
        if h.host is not None:
            tensors, event = h.host
            if event is not None:
                event.synchronize()
                if h.t_start is not None:
                    self.last_step_gpu_ms = h.t_start.elapsed_time(event)
            sampled = (tensors[0], tuple(tensors[1:]) if h.has_lp else None)
            for i, seq, r in zip(h.idx, h.seqs, Sampler.results(sampled, h.states)):
                st = out[i]
                st.token_ids, st.logprobs, st.top_logprobs = r.token_ids, r.logprobs, r.top_logprobs
                for t in r.token_ids:    # (the request as launched: a later plan may have removed or re-added it)
                    seq.token_ids.append(t)
                    seq.sampling.record(t)
        h.result = StepResult(step_id=h.step_id, sampled=out + h.errors)
        return h.result

    def _host_sampling(self, sr: ScheduledRequest, seq) -> bool:
        """Whether this request's sampling in this step needs host work (synchronous sampling)."""
        st = seq.sampling
        return (st.grammar is not None or self.sampler._needs_penalties(st.params) or bool(sr.draft_token_ids)
                or st.params.thinking_budget is not None
                or (bool(st.params.prompt_logprobs) and sr.start < seq.num_prompt))
