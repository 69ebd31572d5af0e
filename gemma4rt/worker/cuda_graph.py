"""CUDA graphs for decode steps.

At start-up the forward pass (embeddings → layers → final norm → tied LM head + soft-cap) is captured
for bucketed batch sizes up to `--cuda-graph-max-bs`, with every input in a static buffer. A decode
step (one new token per request, no drafts, no media, no prompt logprobs) copies its host arrays into
the buffers, pads the batch to the next bucket (padded rows point at each pool's scratch page and
store nothing) and replays. The attention plan (page tables, lengths) is data, outside the graph.
Sampling runs after the replay, eagerly.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from gemma4rt.model.context import ForwardContext

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


class DecodeGraphs:
    def __init__(self, runner, max_bs: int):
        self.runner = runner
        self.device = runner.device
        self.max_bs = max_bs
        self.buckets = buckets(max_bs)
        dev = self.device
        self.scratch = {name: pool.k.shape[1] - 1 for name, pool in runner.kv.items()}
        ctx_len = runner.context_length
        self.width = {name: (ctx_len + pool.page_size - 1) // pool.page_size for name, pool in runner.kv.items()}
        # context buckets: the attention plan (split-KV sizes) follows the page-table width, so short
        # contexts get their own graphs instead of planning for the whole context length
        self.ctx_buckets = sorted({min(ctx_len, c) for c in (4096, ctx_len)})
        B = max_bs
        self.input_ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, dtype=torch.long, device=dev)
        self.cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.tables = {n: torch.full((B, w), self.scratch[n], dtype=torch.int32, device=dev)
                       for n, w in self.width.items()}
        self.slots = {n: torch.full((B,), -1, dtype=torch.long, device=dev) for n in self.width}
        self.logits_indices = torch.arange(B, dtype=torch.long, device=dev)
        self.ple_rows = None
        if runner.ple_host_table is not None:
            self.ple_rows = torch.zeros(B, runner.ple_host_table.shape[1], dtype=runner.ple_host_table.dtype,
                                        device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.pool = None
        # pinned host staging buffers
        self.h_ids = torch.zeros(B, dtype=torch.long).pin_memory()
        self.h_pos = torch.zeros(B, dtype=torch.long).pin_memory()
        self.h_lens = torch.ones(B, dtype=torch.int32).pin_memory()
        self.h_slots = {n: torch.full((B,), -1, dtype=torch.long).pin_memory() for n in self.width}
        self.h_tables = {n: torch.full((B * w,), self.scratch[n], dtype=torch.int32).pin_memory()
                         for n, w in self.width.items()}

    @classmethod
    def maybe_capture(cls, runner) -> Optional["DecodeGraphs"]:
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
        max_bs = min(runner.engine_cfg.cuda_graph_max_bs, runner.engine_cfg.scheduler.max_running_requests)
        g = cls(runner, max_bs)
        try:
            g.capture()
        except Exception as e:
            # keep no traceback (it would pin the runner and its KV pools in memory)
            log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly", type(e).__name__, e)
            g.graphs.clear()
            g.outputs.clear()
            g.runner = None
            torch.cuda.synchronize()
            return None
        return g

    def _w(self, name: str, c: int) -> int:
        return (c + self.runner.kv[name].page_size - 1) // self.runner.kv[name].page_size

    def _ctx(self, b: int, c: int) -> ForwardContext:
        return ForwardContext(
            input_ids=self.input_ids[:b], positions=self.positions[:b], cu_seqlens_q=self.cu[:b + 1],
            seq_lens=self.seq_lens[:b], page_tables={n: t[:b, :self._w(n, c)] for n, t in self.tables.items()},
            slot_mappings={n: t[:b] for n, t in self.slots.items()}, kv=self.runner.kv,
            logits_indices=self.logits_indices[:b],
            ple_token_rows=None if self.ple_rows is None else self.ple_rows[:b])

    @torch.inference_mode()
    def capture(self) -> None:
        model = self.runner.model
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for c in reversed(self.ctx_buckets):
                for b in reversed(self.buckets):
                    ctx = self._ctx(b, c)
                    for _ in range(2):                     # warm up (autotuning, lazy init) outside capture
                        model.compute_logits(model(ctx))
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.pool, stream=stream):
                        out = model.compute_logits(model(ctx))
                    if self.pool is None:
                        self.pool = g.pool()
                    self.graphs[(b, c)] = g
                    self.outputs[(b, c)] = out
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s and contexts %s", self.buckets, self.ctx_buckets)

    def can_run(self, scheduled, seqs) -> bool:
        if not scheduled or len(scheduled) > self.max_bs:
            return False
        for sr in scheduled:
            if sr.num_tokens != 1 or sr.draft_token_ids or not sr.sample:
                return False
            # a decode step (past the prompt) never touches media rows or prompt logprobs
            if sr.start < seqs[sr.rid].num_prompt:
                return False
        return True

    def run(self, arr) -> Optional[torch.Tensor]:
        B = int(arr.input_ids.shape[0])
        b = next(x for x in self.buckets if x >= B)
        c = next((x for x in self.ctx_buckets
                  if all(t.shape[1] <= self._w(n, x) for n, t in arr.page_tables.items())), None)
        if c is None:
            return None                                      # longer than the context: eager path
        self.h_ids[:B] = torch.from_numpy(arr.input_ids)
        self.h_ids[B:b] = 0
        self.h_pos[:B] = torch.from_numpy(arr.positions)
        self.h_pos[B:b] = 0
        self.h_lens[:B] = torch.from_numpy(arr.seq_lens)
        self.h_lens[B:b] = 1
        self.input_ids[:b].copy_(self.h_ids[:b], non_blocking=True)
        self.positions[:b].copy_(self.h_pos[:b], non_blocking=True)
        self.seq_lens[:b].copy_(self.h_lens[:b], non_blocking=True)
        for name, t in arr.page_tables.items():
            # only the used width travels: the kernels never read pages past a row's length
            w = t.shape[1]
            ht = self.h_tables[name][:b * w].view(b, w)
            ht[:B] = torch.from_numpy(np.where(t >= 0, t, self.scratch[name]))
            ht[B:] = self.scratch[name]
            self.tables[name][:b, :w].copy_(ht, non_blocking=True)
            hs = self.h_slots[name]
            hs[:B] = torch.from_numpy(arr.slot_mappings[name])
            hs[B:b] = -1
            self.slots[name][:b].copy_(hs[:b], non_blocking=True)
        if self.ple_rows is not None:
            self.ple_rows[:B].copy_(self.runner.ple_rows_from_host(arr.input_ids), non_blocking=True)
        self.graphs[(b, c)].replay()
        return self.outputs[(b, c)][:B]
