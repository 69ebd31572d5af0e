"""CUDA graphs for decode steps and, optionally, for steps that carry prompt tokens.

At start-up the forward pass (embeddings → layers → final norm → tied LM head + soft-cap) is captured
for bucketed batch sizes up to `--cuda-graph-max-bs`, with every input in a static buffer. A decode
step (one new token per request, no drafts, no media, no prompt logprobs) copies its host arrays into
the buffers, pads the batch to the next bucket (padded rows point at each pool's scratch page and
store nothing) and replays. The attention plan (page tables, lengths) is data, outside the graph.
Sampling runs after the replay, eagerly.

Mixed graphs (`--cuda-graph-max-tokens N` > 0) cover steps whose requests carry any number of tokens
(decode rows beside prompt chunks), at most N tokens and `--cuda-graph-max-bs`
requests: captured for token buckets with the request count fixed at the maximum. A step's tokens
are padded to its bucket; the padded tokens belong to no request (the requests past the real ones own
no rows), store nothing, and their attention output is zeroed (the split merge writes zero rows there),
so that every later op sees finite rows. Such a step replays one graph instead of launching each of its
~600 kernels from Python.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from gemma4rt.model.context import ForwardContext
from gemma4rt.ops.attention import MIXED_ATTN

log = logging.getLogger(__name__)


def buckets(max_bs: int) -> list[int]:
    out = [b for b in (1, 2, 4, 8, 12, 16, 24, 32) if b <= max_bs]
    b = 48
    while b <= max_bs:
        out.append(b)
        b += 16 if b < 128 else 32
    if out[-1] != max_bs:
        out.append(max_bs)
    return out


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts of the mixed graphs: 128-token steps to 1024, 256 to 4096, 512 beyond (a step pads at
    most that many tokens)."""
    out, t = [], 128
    while t < max_tokens:
        out.append(t)
        t += 128 if t < 1024 else 256 if t < 4096 else 512
    out.append(max_tokens)
    return out


DECODE, MIXED = "decode", "mixed"
# speculative decoding: VERIFY graphs run steps of decode rows and draft chains (up to spec_bs requests of
# 1 + num_steps tokens, padded like mixed graphs) and return the final hidden rows, whose logits are computed
# after the replay (one GEMM: the graphs keep no [tokens, vocab] outputs); DRAFT graphs run the drafter's
# num_steps recurrent steps for up to spec_bs requests
VERIFY, DRAFT = "verify", "draft"
SPEC_MAX_BS = 64


class StepGraphs:
    def __init__(self, runner, max_bs: int, max_tokens: int = 0, capture: bool = True, spec_steps: int = 0):
        """max_tokens > 0: also mixed graphs (module docstring). spec_steps > 0 (the runner has a drafter):
        also VERIFY and DRAFT graphs. capture=False builds the static buffers and contexts but runs them
        eagerly (tests of the padding on the CPU)."""
        self.runner = runner
        self.device = runner.device
        self.max_bs = max_bs
        self.buckets = buckets(max_bs)
        self.max_tokens = max(max_tokens, max_bs) if max_tokens > 0 else 0
        self.token_buckets = token_buckets(self.max_tokens) if self.max_tokens else []
        self.spec_steps = spec_steps
        self.spec_bs = min(max_bs, SPEC_MAX_BS) if spec_steps else 0
        self.verify_buckets = token_buckets(self.spec_bs * (1 + spec_steps)) if spec_steps else []
        self.draft_buckets = buckets(self.spec_bs) if spec_steps else []
        self.last_tables: dict[str, torch.Tensor] = {}      # the VERIFY step's page tables (for the drafter)
        self.do_capture = capture
        dev = self.device
        self.scratch = {name: pool.k.shape[1] - 1 for name, pool in runner.kv.items()}
        ctx_len = runner.context_length
        self.width = {name: (ctx_len + pool.page_size - 1) // pool.page_size for name, pool in runner.kv.items()}
        # context buckets: the attention plan (split-KV sizes) follows the page-table width, so short
        # contexts get their own graphs instead of planning for the whole context length
        self.ctx_buckets = sorted({min(ctx_len, c) for c in (4096, ctx_len)})
        B, T = max_bs, max([max_bs, self.max_tokens] + self.verify_buckets)
        self.input_ids = torch.zeros(T, dtype=torch.long, device=dev)
        self.positions = torch.zeros(T, dtype=torch.long, device=dev)
        self.cu, self.seq_lens, self.tables, self.slots = self._plan_buffers(B, T, dev)
        self.logits_indices = torch.arange(T, dtype=torch.long, device=dev)     # VERIFY: a row per token
        self.ple_rows = None
        if runner.ple_host_table is not None:
            self.ple_rows = torch.zeros(T, runner.ple_host_table.shape[1], dtype=runner.ple_host_table.dtype,
                                        device=dev)
        self.graphs: dict[tuple[str, int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int, int], torch.Tensor] = {}
        self.pool = None
        self._staged: Optional[torch.cuda.Event] = None     # recorded after each step's staging copies
        # pinned host staging buffers (plain host memory without a GPU)
        pin = dev.type == "cuda"
        host = lambda *a, **k: torch.full(*a, **k).pin_memory() if pin else torch.full(*a, **k)  # noqa: E731
        self.h_ids = host((T,), 0, dtype=torch.long)
        self.h_pos = host((T,), 0, dtype=torch.long)
        self.h_cu = host((B + 1,), 0, dtype=torch.int32)
        self.h_lens = host((B,), 1, dtype=torch.int32)
        self.h_logit_rows = host((T,), 0, dtype=torch.long)
        self.h_arange = torch.arange(B + 1, dtype=torch.long)        # padded decode rows: cu and logit rows
        self.h_slots = {n: host((T,), -1, dtype=torch.long) for n in self.width}
        self.h_tables = {n: host((B * w,), self.scratch[n], dtype=torch.int32) for n, w in self.width.items()}
        if spec_steps:
            S, d = self.spec_bs, runner.config.text.hidden_size
            self.d_tok = torch.zeros(S, dtype=torch.long, device=dev)
            self.d_hidden = torch.zeros(S, d, dtype=runner.dtype, device=dev)
            self.d_pos = torch.ones(S, dtype=torch.long, device=dev)
            self.d_rows = torch.arange(S, dtype=torch.long, device=dev)
            self.d_cu, self.d_lens, self.d_tables, self.d_slots = self._plan_buffers(S, S, dev)

    def _plan_buffers(self, rows: int, tokens: int, dev) -> tuple:
        """Static attention inputs for `rows` requests and `tokens` tokens: cu_seqlens_q (one token per
        request), sequence lengths 1, page tables on each pool's scratch page, slots storing nothing."""
        return (torch.arange(rows + 1, dtype=torch.int32, device=dev),
                torch.ones(rows, dtype=torch.int32, device=dev),
                {n: torch.full((rows, w), self.scratch[n], dtype=torch.int32, device=dev)
                 for n, w in self.width.items()},
                {n: torch.full((tokens,), -1, dtype=torch.long, device=dev) for n in self.width})

    @classmethod
    def maybe_capture(cls, runner) -> Optional["StepGraphs"]:
        from gemma4rt import ops
        from gemma4rt.ops import _native
        if not ops.NATIVE_AVAILABLE or not _native.has_op("paged_attention"):
            log.warning("CUDA graphs off: the native extension (with its attention kernel) is not built "
                        "(the op references sync the host)")
            return None
        from gemma4rt.ops.attention import NATIVE_HEAD_DIMS
        head_dims = {l.head_dim for l in runner.config.text.layers}
        if runner.dtype not in (torch.bfloat16, torch.float16) or not head_dims <= set(NATIVE_HEAD_DIMS):
            log.warning("CUDA graphs off: the native attention covers bf16/fp16 with head dims %s, this model "
                        "has %s in %s", NATIVE_HEAD_DIMS, sorted(head_dims), runner.dtype)
            return None
        cfg = runner.engine_cfg
        max_bs = min(cfg.cuda_graph_max_bs, cfg.scheduler.max_running_requests)
        g = cls(runner, max_bs, cfg.cuda_graph_max_tokens, spec_steps=runner.spec_steps if runner.drafter else 0)
        try:
            g.capture()
        except Exception as e:
            # keep no traceback (it would pin the runner and its KV pools in memory)
            log.warning("CUDA graph capture failed (%s: %s); steps run eagerly", type(e).__name__, e)
            g.graphs.clear()
            g.outputs.clear()
            g.runner = None
            torch.cuda.synchronize()
            return None
        return g

    def _w(self, name: str, c: int) -> int:
        return (c + self.runner.kv[name].page_size - 1) // self.runner.kv[name].page_size

    def _shape(self, kind: str, n: int) -> tuple[int, int, int]:
        """(requests, tokens, logit rows) of graph (kind, n, ·)."""
        if kind == DECODE:
            return n, n, n
        if kind == MIXED:
            return self.max_bs, n, self.max_bs
        return self.spec_bs, n, n                           # VERIFY: a row per token

    def _ctx(self, kind: str, n: int, c: int) -> ForwardContext:
        """The static context of graph (kind, n, c): n requests of one token (decode) or n tokens of
        max_bs requests (mixed) or of spec_bs requests (verify)."""
        if kind == DRAFT:
            return ForwardContext(
                input_ids=self.d_tok[:n], positions=self.d_pos[:n], cu_seqlens_q=self.d_cu[:n + 1],
                seq_lens=self.d_lens[:n], page_tables={k: v[:n, :self._w(k, c)] for k, v in self.d_tables.items()},
                slot_mappings={k: v[:n] for k, v in self.d_slots.items()}, kv=self.runner.kv,
                logits_indices=self.d_rows[:n], allow_shared_layer_skip=False)
        b, t, nl = self._shape(kind, n)
        return ForwardContext(
            input_ids=self.input_ids[:t], positions=self.positions[:t], cu_seqlens_q=self.cu[:b + 1],
            seq_lens=self.seq_lens[:b], page_tables={k: v[:b, :self._w(k, c)] for k, v in self.tables.items()},
            slot_mappings={k: v[:t] for k, v in self.slots.items()}, kv=self.runner.kv,
            logits_indices=self.logits_indices[:nl],
            ple_token_rows=None if self.ple_rows is None else self.ple_rows[:t],
            # mixed / verify: the rows of padded tokens are no request's (zeroed attention output), and every
            # layer runs every row (no KV-shared-layer row skipping, whose shapes follow the data)
            allow_shared_layer_skip=kind == DECODE, zero_attn_out=kind != DECODE,
            mixed_attn=kind == MIXED and MIXED_ATTN)

    def _capture_inputs(self, kind: str, n: int) -> None:
        """Valid static inputs to capture graph (kind, n, ·) with: every request of one token on the scratch
        pages, storing nothing. A mixed graph may have more requests than tokens (max_bs requests, a
        128-token bucket): the requests past its n tokens own none, and the logit rows stay below n. (An
        arange over the requests there had them read and write rows past the buffers: on an H200 capture
        at 160 requests hit an illegal memory access.)"""
        if kind == DRAFT:
            self.d_tok.zero_()
            self.d_hidden.zero_()
            self.d_pos.fill_(1)
            self.d_lens.fill_(1)
            for name, tb in self.d_tables.items():
                tb.fill_(self.scratch[name])
            return
        b, t, nl = self._shape(kind, n)
        r = torch.arange(max(b + 1, nl), dtype=torch.long)
        self.cu[:b + 1].copy_(r[:b + 1].clamp(max=t))
        self.logits_indices[:nl].copy_(r[:nl].clamp(max=t - 1))
        self.seq_lens[:b].fill_(1)
        self.input_ids[:t].zero_()
        self.positions[:t].zero_()
        for name, tb in self.tables.items():
            tb.fill_(self.scratch[name])
            self.slots[name].fill_(-1)

    def keys(self) -> list[tuple[str, int, int]]:
        return ([(DECODE, b, c) for c in self.ctx_buckets for b in self.buckets] +
                [(MIXED, t, c) for c in self.ctx_buckets for t in self.token_buckets] +
                [(VERIFY, t, c) for c in self.ctx_buckets for t in self.verify_buckets] +
                [(DRAFT, b, c) for c in self.ctx_buckets for b in self.draft_buckets])

    def _forward(self, kind: str, ctx: ForwardContext) -> torch.Tensor:
        """What graph `kind` computes: logits (decode, mixed), final hidden rows (verify), drafts (draft)."""
        r = self.runner
        if kind == DRAFT:
            n = ctx.input_ids.shape[0]
            lm = r.model.language_model
            return r.drafter.draft(ctx, ctx.input_ids, self.d_hidden[:n], lm.embed_tokens.weight, lm.embed_scale(),
                                   self.spec_steps, r.sampler.sample_limit)
        hidden = r.model(ctx)
        return hidden if kind == VERIFY else r.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        from gemma4rt.ops.attention import merge_counters
        from gemma4rt.ops.linear import gemv_norm_counter
        merge_counters(self.device)            # outside any graph's memory pool
        gemv_norm_counter(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for key in reversed(self.keys()):                 # largest first: later ones reuse its memory
                self._capture_inputs(*key[:2])
                ctx = self._ctx(*key)
                for _ in range(2):                     # warm up (autotuning, lazy init) outside capture
                    self._forward(key[0], ctx)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    out = self._forward(key[0], ctx)
                if self.pool is None:
                    self.pool = g.pool()
                self.graphs[key] = g
                self.outputs[key] = out
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s and contexts %s%s%s", self.buckets, self.ctx_buckets,
                 f", mixed-step graphs for {self.token_buckets} tokens" if self.token_buckets else "",
                 f", speculative verification graphs for {self.verify_buckets} tokens and drafter graphs for "
                 f"{self.draft_buckets} requests" if self.spec_steps else "")

    def release(self) -> None:
        """Free every captured graph and its memory pool (before leaving a tensor-parallel group: NCCL
        work captured in a live graph makes destroy_process_group hang, pytorch/pytorch#115388)."""
        for g in self.graphs.values():
            g.reset()
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None

    def can_verify(self, scheduled, seqs) -> bool:
        """Whether a VERIFY graph can run this step: decode rows and draft chains only (no prompt rows),
        at most spec_bs requests."""
        if not self.spec_steps or not scheduled or len(scheduled) > self.spec_bs:
            return False
        tokens = 0
        for sr in scheduled:
            seq = seqs[sr.rid]
            if not sr.sample or sr.start < seq.num_prompt or sr.num_tokens != 1:
                return False
            tokens += 1 + len(sr.draft_token_ids)
        return tokens <= self.verify_buckets[-1]

    def can_run(self, scheduled, seqs) -> Optional[str]:
        """DECODE or MIXED when a graph can run this step, else None."""
        if not scheduled or len(scheduled) > self.max_bs:
            return None
        kind = DECODE
        tokens = 0
        for sr in scheduled:
            if sr.draft_token_ids:
                return None
            seq = seqs[sr.rid]
            tokens += sr.num_tokens
            if sr.num_tokens != 1 or not sr.sample or sr.start < seq.num_prompt:
                # prompt rows: no prompt logprobs (logits of every row), no media rows (soft tokens,
                # bidirectional blocks)
                if not self.max_tokens or seq.sampling.params.prompt_logprobs or seq.mm_items:
                    return None
                kind = MIXED
        if kind == MIXED and tokens > self.max_tokens:
            return None
        return kind

    def run(self, arr, kind: str = DECODE, fix=None) -> Optional[torch.Tensor]:
        """Replay the graph for this step's arrays; None when no graph fits (the caller runs eagerly).
        fix: (rows, tokens) device tensors written into the input ids after the copy (overlap scheduling:
        tokens the previous step sampled, still on the device)."""
        B, T = int(arr.seq_lens.shape[0]), int(arr.input_ids.shape[0])
        N = int(arr.logits_indices.shape[0])
        if kind == DECODE:
            n = next(x for x in self.buckets if x >= B)
        else:
            n = next(x for x in (self.verify_buckets if kind == VERIFY else self.token_buckets) if x >= T)
        b, t, nl = self._shape(kind, n)
        c = next((x for x in self.ctx_buckets
                  if all(tb.shape[1] <= self._w(name, x) for name, tb in arr.page_tables.items())), None)
        if c is None:
            return None                                      # longer than the context: eager path
        if self._staged is not None:
            # the pinned staging buffers are rewritten below: the previous step's copies out of them must
            # have run (with overlap scheduling the host gets here while that step may still be queued)
            self._staged.synchronize()
        self.h_ids[:T] = torch.from_numpy(arr.input_ids)
        self.h_ids[T:t] = 0
        self.h_pos[:T] = torch.from_numpy(arr.positions)
        self.h_pos[T:t] = 0
        self.h_cu[:B + 1] = torch.from_numpy(arr.cu_seqlens)
        # padded requests: one token each at decode (their rows read the scratch page); none when mixed
        self.h_cu[B + 1:b + 1] = self.h_arange[B + 1:b + 1] if kind == DECODE else T
        self.h_lens[:B] = torch.from_numpy(arr.seq_lens)
        self.h_lens[B:b] = 1
        self.h_logit_rows[:N] = torch.from_numpy(arr.logits_indices)
        self.h_logit_rows[N:nl] = self.h_arange[N:nl] if kind == DECODE else 0
        self.input_ids[:t].copy_(self.h_ids[:t], non_blocking=True)
        if fix is not None:
            self.input_ids.index_copy_(0, *fix)
        self.positions[:t].copy_(self.h_pos[:t], non_blocking=True)
        self.cu[:b + 1].copy_(self.h_cu[:b + 1], non_blocking=True)
        self.seq_lens[:b].copy_(self.h_lens[:b], non_blocking=True)
        self.logits_indices[:nl].copy_(self.h_logit_rows[:nl], non_blocking=True)
        for name, tb in arr.page_tables.items():
            # only the used width travels: the kernels never read pages past a row's length
            w = tb.shape[1]
            ht = self.h_tables[name][:b * w].view(b, w)
            ht[:B] = torch.from_numpy(np.where(tb >= 0, tb, self.scratch[name]))
            ht[B:] = self.scratch[name]
            self.tables[name][:b, :w].copy_(ht, non_blocking=True)
            hs = self.h_slots[name]
            hs[:T] = torch.from_numpy(arr.slot_mappings[name])
            hs[T:t] = -1
            self.slots[name][:t].copy_(hs[:t], non_blocking=True)
        if self.ple_rows is not None:
            self.ple_rows[:T].copy_(self.runner.ple_rows_from_host(arr.input_ids), non_blocking=True)
            self.ple_rows[T:t].zero_()
        if self.device.type == "cuda":
            if self._staged is None:
                self._staged = torch.cuda.Event()
            self._staged.record()
        if kind == VERIFY:
            self.last_tables = {name: self.tables[name][:B, :tb.shape[1]] for name, tb in arr.page_tables.items()}
        key = (kind, n, c)
        if not self.do_capture:
            return self._forward(kind, self._ctx(*key))[:N]
        self.graphs[key].replay()
        return self.outputs[key][:N]

    def run_draft(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                  tables: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The drafter's chain for B ≤ spec_bs requests through a DRAFT graph (device inputs: newest tokens,
        the target's hidden rows, their positions, page tables): [B, num_steps], or None (no graph fits)."""
        B = int(tokens.shape[0])
        if not self.spec_steps or B > self.spec_bs:
            return None
        c = next((x for x in self.ctx_buckets if all(tb.shape[1] <= self._w(k, x) for k, tb in tables.items())), None)
        if c is None:
            return None
        n = next(x for x in self.draft_buckets if x >= B)
        self.d_tok[:B].copy_(tokens)
        self.d_tok[B:n] = 0
        self.d_hidden[:B].copy_(hidden)
        self.d_hidden[B:n] = 0
        self.d_pos[:B].copy_(positions)
        self.d_pos[B:n] = 1
        self.d_lens[:B].copy_(positions)                      # keys before each newest token
        self.d_lens[B:n] = 1
        for k, tb in tables.items():
            w = tb.shape[1]
            self.d_tables[k][:B, :w].copy_(tb)
            self.d_tables[k][B:n, :w] = self.scratch[k]
        key = (DRAFT, n, c)
        if not self.do_capture:
            return self._forward(DRAFT, self._ctx(*key))[:B]
        self.graphs[key].replay()
        return self.outputs[key][:B]
