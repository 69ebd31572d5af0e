"""ModelRunner: loads a Gemma 4 model, owns its KV tensors, and executes StepPlans.

`execute(plan)` applies the plan to the persistent batch (per-request token ids, page tables and
sampling state), builds one ForwardContext for all scheduled requests, runs the forward pass, and
samples. The same code serves the offline LLM, the server's engine process, the CPU path (op
references) and the GPU path (native ops). Overlap scheduling (launch / collect) lives in worker/overlap.py,
speculative decoding (draft verification and drafting) in worker/speculative.py; both are mixed in.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Optional

import msgspec
import numpy as np
import torch

from gemma4rt.config import EngineConfig, ModelInfo, PoolSpec
from gemma4rt.model.context import ForwardContext
from gemma4rt.model.gemma4 import Gemma4Model
from gemma4rt.model.loader import init_dummy_weights, load_weights, resolve_model_path
from gemma4rt.model.parallel import NO_TP, TP, check_tp
from gemma4rt.ops.attention import mixed_step
from gemma4rt.model_config import ModelConfig, load_model_config, parse_model_config
from gemma4rt.protocol import NewRequestData, SampledTokens, ScheduledRequest, StepPlan, StepResult
from gemma4rt.worker.constrained import GrammarSlots
from gemma4rt.worker.cuda_graph import VERIFY
from gemma4rt.worker.kv_cache import allocate_pools, plan_pools
from gemma4rt.worker.sampler import Sampler, SeqSamplingState, prompt_logprobs
from gemma4rt.worker.overlap import OverlapMixin
from gemma4rt.worker.page_tables import PageTableRows
from gemma4rt.worker.speculative import SpeculativeMixin, _Tables
from gemma4rt.worker.transfer import to_device

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
           "float": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in ("auto", "", None):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown --dtype {name!r} (use auto, bfloat16, float16 or float32)")
    return _DTYPES[name]


@dataclass
class StepArrays:
    """Host-side inputs of one step (see ForwardContext for the meaning of each)."""

    input_ids: np.ndarray
    positions: np.ndarray
    cu_seqlens: np.ndarray
    seq_lens: np.ndarray
    page_tables: dict[str, np.ndarray]
    slot_mappings: dict[str, np.ndarray]
    logits_indices: np.ndarray


@dataclass
class _Seq:
    rid: str
    token_ids: list[int]
    num_prompt: int
    pages: dict[str, list[int]]
    sampling: SeqSamplingState
    mm_items: list = field(default_factory=list)
    row: int = -1                       # its row in ModelRunner.page_rows


class ModelRunner(OverlapMixin, SpeculativeMixin):
    def __init__(self, engine_cfg: EngineConfig, tp: TP = NO_TP):
        """tp: this rank's place in a tensor-parallel group (worker/tp_worker.py starts the ranks); rank 0
        samples and answers, the others run the same forward passes (follow())."""
        self.engine_cfg = engine_cfg
        self.tp = tp
        self.device = resolve_device(engine_cfg.device)
        if self.device.type == "cuda" and tp.size > 1:
            self.device = torch.device("cuda", tp.rank)
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(engine_cfg.dtype, self.device)
        torch.manual_seed(engine_cfg.seed)
        self._rng = random.Random(engine_cfg.seed)
        self.model_dir, self.config, gen_cfg = self._resolve_checkpoint(engine_cfg)
        why = check_tp(self.config.text, tp.size)
        if why is not None:
            raise ValueError(why)
        with torch.device("meta"):
            model = Gemma4Model(self.config, tp)
        model.eval()
        if self.model_dir is not None and engine_cfg.load_format != "dummy":
            load_weights(model, self.config, self.model_dir, self.dtype, self.device, tp=tp)
        else:
            init_dummy_weights(model, self.dtype, self.device, seed=engine_cfg.seed, tp=tp)
        self.ple_host_table = None
        if engine_cfg.ple_on_host and self.config.text.has_ple and self.device.type == "cuda":
            # 2.3-2.8 B parameters that are only gathered: keep them in pinned host memory
            from gemma4rt.model.loader import set_tensor
            name = "language_model.embed_tokens_per_layer.weight"
            w = model.get_parameter(name).detach().to("cpu").pin_memory()
            set_tensor(model, name, w)
            self.ple_host_table = w
            torch.cuda.empty_cache()
            log.info("PLE table (%.2f GB) kept in pinned host memory", w.numel() * w.element_size() / 1e9)
        if os.environ.get("GEMMA4RT_FUSE_PROJECTIONS", "1") != "0":
            model.language_model.fuse_projections()
        self.model = model
        self._load_drafter(engine_cfg)
        text = self.config.text
        self.context_length = int(engine_cfg.context_length or text.max_position_embeddings)
        cc = engine_cfg.cache
        sc = engine_cfg.scheduler
        budget = None
        if self.device.type == "cuda":
            budget = self._gpu_kv_budget(cc.mem_fraction_static)
        # the full pool never needs more than every running request at full context
        max_tokens = cc.max_total_tokens or (
            min(self.context_length * 4, 1 << 16) if budget is None
            else self.context_length * sc.max_running_requests)
        chunk = sc.chunked_prefill_size if sc.chunked_prefill_size > 0 else self.context_length
        self.pool_specs: list[PoolSpec] = plan_pools(text, cc.page_size, self.dtype, max_tokens,
                                                     sc.max_running_requests, budget,
                                                     max_chunk_tokens=min(chunk, self.context_length), tp=tp)
        if tp.size > 1:
            # one scheduler hands out pages for every rank: each pool gets what the tightest rank can hold
            import dataclasses
            import torch.distributed as dist
            n = torch.tensor([s.num_pages for s in self.pool_specs], dtype=torch.int64)
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=tp.ctrl)
            self.pool_specs = [dataclasses.replace(s, num_pages=int(k)) for s, k in zip(self.pool_specs, n.tolist())]
        self.kv = allocate_pools(text, self.pool_specs, self.dtype, self.device, tp=tp)
        for s in self.pool_specs:
            log.info("KV pool %s: %d pages x %d tokens (%.1f MiB)", s.name, s.num_pages, s.page_size,
                     s.num_pages * s.bytes_per_page / 2**20)
        suppress = ()
        if self.config.is_unified:
            suppress = tuple(t for t in (self.config.eoi_token_id, self.config.eoa_token_id) if t is not None)
        self.model_info = ModelInfo(
            name=engine_cfg.served_model_name or (engine_cfg.model_path or "gemma4rt-demo"),
            model_path=self.model_dir or (engine_cfg.model_path or ""),
            context_length=self.context_length, vocab_size=text.vocab_size,
            eos_token_ids=tuple(self.config.eos_token_ids), bos_token_id=text.bos_token_id,
            pad_token_id=text.pad_token_id, suppress_token_ids=suppress,
            image_token_id=self.config.image_token_id, audio_token_id=self.config.audio_token_id,
            video_token_id=self.config.video_token_id,
            has_vision=bool(getattr(model, "has_vision", False)), has_audio=bool(getattr(model, "has_audio", False)),
            bidirectional_vision=text.use_bidirectional_attention == "vision",
            generation_defaults={k: gen_cfg[k] for k in ("temperature", "top_k", "top_p", "min_p",
                                                         "repetition_penalty") if k in gen_cfg})
        self.sampler = Sampler(text.vocab_size, self.model_info.eos_token_ids,
                               *self._stand_in_vocab(text.vocab_size, self.model_info.eos_token_ids))
        self.grammars = GrammarSlots(self._load_tokenizer, text.vocab_size, self.model_info.eos_token_ids)
        self.seqs: dict[str, _Seq] = {}
        self.page_rows = PageTableRows([s.name for s in self.pool_specs],
                                       width=min(512, -(-self.context_length // min(s.page_size for s in self.pool_specs)) + 2),
                                       rows=max(16, engine_cfg.scheduler.max_running_requests + 1))
        self.mm_cache: dict = {}            # encoder outputs by content hash (LRU, see mm_inputs)
        self._mm_rids: set[str] = set()     # requests that carry media
        self._failed: set[str] = set()      # requests failed in a step (their media): skipped until removed
        self._grammar_rids: set[str] = set()  # requests with a grammar
        # overlap scheduling: the last launched step's sampled ids on the device and each request's row in
        # them; a later step whose input is one of those tokens reads it there (launch())
        self._last_sampled: Optional[tuple[torch.Tensor, dict[str, int]]] = None
        self._step_missing: list[tuple[int, str]] = []
        self._open = None                           # the launched step not collected yet (overlap.py)
        self.graphs = None
        if self.device.type == "cuda" and not engine_cfg.disable_cuda_graph:
            from gemma4rt.worker.cuda_graph import StepGraphs
            self.graphs = StepGraphs.maybe_capture(self)

    # ------------------------------------------------------------------ setup
    def _resolve_checkpoint(self, cfg: EngineConfig) -> tuple[Optional[str], ModelConfig, dict]:
        path = cfg.model_path
        if path is None:
            from gemma4rt.tools.tiny_checkpoint import demo_checkpoint_path
            path = str(demo_checkpoint_path())
            log.info("no --model-path given: serving the built-in demo model (a tiny random Gemma 4) at %s", path)
        if cfg.load_format == "dummy" and not os.path.isdir(path):
            from gemma4rt.configs import lookup_builtin_config
            builtin = lookup_builtin_config(path)
            if builtin is None:
                raise ValueError(f"--load-format dummy: {path!r} is neither a directory nor a built-in "
                                 f"geometry name (e.g. gemma-4-E4B-it)")
            return None, parse_model_config(builtin), {}
        model_dir = resolve_model_path(path, cfg.revision)
        gen = {}
        gp = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(gp):
            with open(gp) as f:
                gen = json.load(f)
        return model_dir, load_model_config(model_dir), gen

    @property
    def tokenizer_path(self) -> str:
        """Directory with the HF tokenizer and chat template (resolved on first use)."""
        if getattr(self, "_tok_path", None) is None:
            self._tok_path = self.engine_cfg.tokenizer_path or self._tokenizer_dir()
        return self._tok_path

    def _load_tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.tokenizer_path)

    def _tokenizer_dir(self) -> str:
        if self.model_dir and any(os.path.isfile(os.path.join(self.model_dir, f))
                                  for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return self.model_dir
        from gemma4rt.tools.tiny_checkpoint import demo_checkpoint_path
        log.warning("no tokenizer with this model: using the demo tokenizer (token-id requests only are meaningful)")
        return str(demo_checkpoint_path())

    def _stand_in_vocab(self, vocab_size: int, eos_ids) -> tuple[Optional[int], tuple[int, ...]]:
        """A real-size model with dummy weights served with the demo tokenizer samples only what that
        tokenizer renders as text: ids below its length, no special or control tokens but EOS. Otherwise a
        random model streams ids that show as nothing (beyond the tokenizer, or skipped specials)
        and a client sees its first text hundreds of tokens late. (None, ()) with the model's own."""
        from gemma4rt.tools.tiny_checkpoint import demo_checkpoint_path
        if self.engine_cfg.tokenizer_path or self.tokenizer_path != str(demo_checkpoint_path()):
            return None, ()
        tok = self._load_tokenizer()
        n = len(tok)
        if n >= vocab_size:
            return None, ()
        # specials and Gemma's control tokens (<|channel>, <|tool_call>, <turn|>, ...): a random model
        # that emits <|channel> would turn the rest of its answer into hidden thought
        control = set(getattr(tok, "added_tokens_decoder", {}) or {}) | set(tok.all_special_ids)
        never = tuple(sorted(control - set(eos_ids)))
        log.warning("sampling only ids below %d (the demo tokenizer's size) of the model's %d, no special or "
                    "control tokens but EOS", n, vocab_size)
        return n, never

    def _gpu_kv_budget(self, frac: float) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        sc = self.engine_cfg.scheduler
        text = self.config.text
        chunk = max(sc.chunked_prefill_size, 2048)
        act = chunk * (text.hidden_size * 4 + max(l.intermediate_size for l in text.layers) * 3) * 4
        logits = sc.max_running_requests * text.vocab_size * 4 * 4
        return int(max(0, frac * total - used - act - logits))

    # ------------------------------------------------------------------ steps
    def _add(self, nr: NewRequestData) -> None:
        p = nr.sampling
        seed = p.seed if p.seed is not None else self._rng.getrandbits(62)
        st = SeqSamplingState(params=p, seed=seed, prompt_ids=list(nr.token_ids[:nr.num_prompt_tokens]))
        generated = nr.token_ids[nr.num_prompt_tokens:nr.num_prompt_tokens + nr.num_output_tokens]
        for t in generated:
            st.record(t)
        if p.grammar is not None and self.tp.rank == 0:      # only rank 0 samples
            st.grammar = self.grammars.start(p.grammar, generated)   # compiles in the background
            self._grammar_rids.add(nr.rid)
        if nr.mm_items:
            self._mm_rids.add(nr.rid)
        if nr.rid in self.seqs:          # (a plan re-adds a request it also removed: replace it)
            self._drop(nr.rid)
        seq = _Seq(nr.rid, list(nr.token_ids), nr.num_prompt_tokens, {k: list(v) for k, v in nr.pages.items()}, st,
                   list(nr.mm_items), self.page_rows.alloc())
        for k, v in nr.pages.items():
            self.page_rows.extend(k, seq.row, v)
        self.seqs[nr.rid] = seq

    def _drop(self, rid: str) -> None:
        seq = self.seqs.pop(rid, None)
        if seq is not None:
            self.page_rows.release(seq.row)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        if self.tp.size > 1:
            dead = [p for p in getattr(self, "tp_procs", ()) if not p.is_alive()]
            if dead:     # fail the step at once rather than wait in a collective for a rank that is gone
                raise RuntimeError(f"tensor-parallel rank process {dead[0].name} exited (code {dead[0].exitcode}); "
                                   "restart the server")
            _broadcast(plan, self.tp)               # the other ranks run the same step (follow())
        t_start = self._timing_event()
        scheduled, errors, logits, rows = self._forward(plan)
        if logits is None:
            return StepResult(step_id=plan.step_id, sampled=errors)
        try:
            sampled = self._sample(scheduled, logits, rows)
        except BaseException:
            if self.tp.size > 1:        # the other ranks wait for this step's tokens: none
                _broadcast([[] for _ in scheduled], self.tp, _TOKENS_DECODER)
            raise
        if t_start is not None:         # sampling has waited for the device: the end event is cheap
            t_end = self._timing_event()
            t_end.synchronize()
            self.last_step_gpu_ms = t_start.elapsed_time(t_end)
        if self.tp.size > 1:
            _broadcast([s.token_ids for s in sampled], self.tp, _TOKENS_DECODER)
        return StepResult(step_id=plan.step_id, sampled=sampled + errors)

    @torch.inference_mode()
    def follow(self) -> bool:
        """Ranks > 0 of a tensor-parallel group: run the step rank 0 broadcasts and append the tokens it
        sampled (rank 0 alone samples). False when rank 0 says stop."""
        plan = _broadcast(None, self.tp)
        if plan is None:
            return False
        try:
            scheduled, _, logits, _ = self._forward(plan, logits_needed=False)
        except Exception:
            # as on rank 0, where Engine.step fails the step's requests and goes on: the same inputs raise
            # at the same point on every rank, and rank 0 then broadcasts no tokens
            log.exception("tensor-parallel rank %d: step %d failed", self.tp.rank, plan.step_id)
            return True
        if logits is not None:
            for sr, toks in zip(scheduled, _broadcast(None, self.tp, _TOKENS_DECODER)):
                self.seqs[sr.rid].token_ids.extend(toks)
        return True

    def stop_followers(self) -> None:
        """Rank 0: tell the other ranks to return from follow()."""
        if self.tp.size > 1 and self.tp.rank == 0:
            _broadcast(None, self.tp)

    def _forward(self, plan: StepPlan, logits_needed: bool = True):
        """Apply the plan to the persistent batch and run the forward pass. Returns (scheduled requests,
        errors of requests whose media failed, logits or None when nothing ran, logit rows per request);
        logits_needed=False (a rank that does not sample) may return any non-None stand-in."""
        for rid in plan.removed_rids:
            self._drop(rid)
            self._mm_rids.discard(rid)
            self._grammar_rids.discard(rid)
            self._failed.discard(rid)
        for nr in plan.new_requests:
            self._add(nr)
        scheduled = plan.scheduled
        failed = self._encode_media(scheduled) if self._mm_rids else {}
        if failed:                 # a request whose media cannot be encoded fails alone
            self._failed.update(failed)
        if self._failed:           # (overlap scheduling: a later plan made before its error came back)
            scheduled = [sr for sr in scheduled if sr.rid not in self._failed]
        errors = [SampledTokens(rid=rid, token_ids=[], error=e) for rid, e in failed.items()]
        if not scheduled:
            return scheduled, errors, None, None
        logits = None
        self._step_ctx = self._step_hidden = None
        kind = self.graphs.can_run(scheduled, self.seqs) if self.graphs is not None else None
        if self.drafter is not None and any(self._spec_ok(self.seqs[sr.rid]) for sr in scheduled):
            # the drafter needs the final hidden states: a VERIFY graph returns them, else an eager step
            kind = VERIFY if self.graphs is not None and self.graphs.can_verify(scheduled, self.seqs) else None
        arr = None
        if kind is not None:
            arr, rows = self._host_arrays(scheduled)
            fix = self._missing_tokens()
            out = self.graphs.run(arr, kind, fix)
            if out is not None and kind == VERIFY:
                self._step_ctx, self._step_hidden = _Tables(self.graphs.last_tables), out
                logits = self.model.compute_logits(out) if logits_needed else out
            else:
                logits = out
        if logits is None:                        # eager (also a step longer than every graph's context)
            ctx, rows = self._build_context(scheduled, None if arr is None else (arr, rows))
            fix = self._missing_tokens() if arr is None else fix
            if fix is not None:
                ctx.input_ids.index_copy_(0, *fix)
            hidden = self.model(ctx)
            if self.drafter is not None:
                self._step_ctx, self._step_hidden = ctx, hidden
            logits = self.model.compute_logits(hidden) if logits_needed else hidden
        return scheduled, errors, logits, rows

    def _encode_media(self, scheduled: list[ScheduledRequest]) -> dict[str, str]:
        """Encode (into the encoder cache) the media rows this step reaches; {rid: error} for the
        requests whose media fail, so that one bad item never fails the rest of the batch."""
        from gemma4rt.worker.mm_inputs import cached_encode
        failed = {}
        for sr in scheduled:
            if sr.rid not in self._mm_rids:
                continue
            for item in self.seqs[sr.rid].mm_items:
                if item.offset < sr.start + sr.num_tokens and item.offset + item.num_tokens > sr.start:
                    try:
                        cached_encode(self.model, item, self.mm_cache, self.device)
                    except Exception as e:
                        log.warning("request %s: cannot encode its %s: %s", sr.rid, item.modality, e)
                        failed[sr.rid] = f"Cannot encode the request's {item.modality} ({type(e).__name__}: {e})."
                        break
        return failed

    def _host_arrays(self, scheduled: list[ScheduledRequest]) -> tuple[StepArrays, list]:
        """The step's inputs as host (numpy) arrays, vectorised: the host cost of a step must stay far
        below a GPU step. Returns the arrays and, per request, (first logit row, number of rows)."""
        B = len(scheduled)
        seqs = [self.seqs[sr.rid] for sr in scheduled]
        toks: list[int] = []
        starts = np.empty(B, dtype=np.int64)
        ns = np.empty(B, dtype=np.int64)
        logit_rows: list[int] = []
        rows = []
        base = 0
        self._step_missing = missing = []
        for b, (sr, seq) in enumerate(zip(scheduled, seqs)):
            for name, pages in sr.new_pages.items():
                seq.pages[name].extend(pages)
                self.page_rows.extend(name, seq.row, pages)
            t = seq.token_ids[sr.start:sr.start + sr.num_tokens]
            if len(t) < sr.num_tokens:
                # overlap scheduling: the last input token was sampled by the step in flight and is
                # still on the device (launch() writes it into the step's input ids there)
                if len(t) != sr.num_tokens - 1 or self._last_sampled is None or sr.rid not in self._last_sampled[1]:
                    raise RuntimeError(f"request {sr.rid}: tokens [{sr.start}, {sr.start + sr.num_tokens}) "
                                       f"scheduled, {len(seq.token_ids)} known")
                missing.append((base + len(t), sr.rid))
                t = t + [0]
            if sr.draft_token_ids:
                t = t + list(sr.draft_token_ids)
            n = len(t)
            toks.extend(t)
            starts[b], ns[b] = sr.start, n
            if seq.sampling.params.prompt_logprobs and sr.start < seq.num_prompt:
                rows.append((len(logit_rows), n))
                logit_rows.extend(range(base, base + n))
            elif sr.sample or sr.draft_token_ids:
                k = 1 + len(sr.draft_token_ids)
                rows.append((len(logit_rows), k))
                logit_rows.extend(range(base + n - k, base + n))
            else:
                rows.append((len(logit_rows), 0))
            base += n
        T = base
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(ns, out=cu[1:])
        req_of_row = np.repeat(np.arange(B), ns)
        pos = np.arange(T, dtype=np.int64) + np.repeat(starts - cu[:-1], ns)
        tables, slot_maps = {}, {}
        prow = np.fromiter((seq.row for seq in seqs), dtype=np.int64, count=B)
        for name, pool in self.kv.items():
            S = pool.page_size
            table = self.page_rows.table(name, prow)
            width = table.shape[1]
            lp = pos // S
            pages = np.where(lp < width, table[req_of_row, np.minimum(lp, width - 1)], -1)
            slot_maps[name] = np.where(pages >= 0, pages.astype(np.int64) * S + pos % S, -1)
            tables[name] = table
        arr = StepArrays(input_ids=np.asarray(toks, dtype=np.int64), positions=pos, cu_seqlens=cu.astype(np.int32),
                         seq_lens=(starts + ns).astype(np.int32), page_tables=tables, slot_mappings=slot_maps,
                         logits_indices=np.asarray(logit_rows, dtype=np.int64))
        return arr, rows

    def _build_context(self, scheduled: list[ScheduledRequest], built: Optional[tuple] = None):
        """The step's ForwardContext on the device (built: its (host arrays, rows) when already made)."""
        arr, rows = built if built is not None else self._host_arrays(scheduled)
        dev = self.device
        t = lambda a: to_device(torch.from_numpy(a), dev)  # noqa: E731
        ctx = ForwardContext(
            input_ids=t(arr.input_ids), positions=t(arr.positions), cu_seqlens_q=t(arr.cu_seqlens),
            seq_lens=t(arr.seq_lens), page_tables={k: t(v) for k, v in arr.page_tables.items()},
            slot_mappings={k: t(v) for k, v in arr.slot_mappings.items()}, kv=self.kv,
            logits_indices=t(arr.logits_indices), mixed_attn=mixed_step(np.diff(arr.cu_seqlens).tolist()))
        if self.ple_host_table is not None:
            ctx.ple_token_rows = self.ple_rows_from_host(arr.input_ids).to(dev, non_blocking=True)
        if any(self.seqs[sr.rid].mm_items for sr in scheduled):
            # soft tokens of images / audio in this step's rows, and bidirectional image blocks
            from gemma4rt.worker.mm_inputs import attach_mm_inputs
            attach_mm_inputs(self.model, ctx, [(sr, self.seqs[sr.rid]) for sr in scheduled], self.mm_cache)
        return ctx, rows

    def ple_rows_from_host(self, input_ids: np.ndarray) -> torch.Tensor:
        """E_ple rows of a step's tokens gathered from the host table into pinned memory
        (multimodal placeholders look up the pad row, as the model does)."""
        ids = torch.from_numpy(input_ids)
        mm = self.model.language_model.mm_token_ids
        if mm:
            ids = torch.where(torch.isin(ids, torch.tensor(mm)), self.config.text.pad_token_id, ids)
        table = self.ple_host_table
        buf = getattr(self, "_ple_pinned", None)
        if buf is None or buf.shape[0] < ids.shape[0]:
            # reused between steps: a step's copy has finished before the next step's gather
            buf = torch.empty(max(ids.shape[0], 256), table.shape[1], dtype=table.dtype, pin_memory=True)
            self._ple_pinned = buf
        out = buf[:ids.shape[0]]
        torch.index_select(table, 0, ids, out=out)
        return out

    def _sample(self, scheduled: list[ScheduledRequest], logits: torch.Tensor, rows) -> list[SampledTokens]:
        out: list[SampledTokens] = []
        sample_rows, sample_states, sample_idx = [], [], []
        verify: list[tuple[int, int, int]] = []         # (index, first logit row, rows): draft verification
        for i, (sr, (first, n)) in enumerate(zip(scheduled, rows)):
            seq = self.seqs[sr.rid]
            st = SampledTokens(rid=sr.rid, token_ids=[])
            p = seq.sampling.params
            # row i of this chunk predicts token start + i + 1; those still in the prompt get logprobs
            end = min(sr.start + sr.num_tokens + 1, seq.num_prompt)
            if p.prompt_logprobs and n and (sr.start == 0 or sr.start + 1 < end):
                nxt = seq.token_ids[sr.start + 1:end]
                lp, top = prompt_logprobs(logits[first:first + len(nxt)], nxt, p.top_logprobs) if nxt else ([], [])
                head: list = [None] if sr.start == 0 else []
                st.prompt_logprobs = head + lp
                st.prompt_top_logprobs = head + top
            g = seq.sampling.grammar
            if sr.sample and g is not None and g.matcher is not None and g.matcher.is_terminated():
                pass           # overlap: planned before its grammar ended it (the scheduler drops this step)
            elif sr.sample and sr.draft_token_ids:
                verify.append((i, first, n))
            elif sr.sample:
                sample_rows.append(first + n - 1)
                sample_states.append(seq.sampling)
                sample_idx.append(i)
            out.append(st)
        accepted = self._verify(scheduled, logits, verify, out) if verify else {}
        if sample_rows:
            # grammar masks on the CPU while the GPU still runs the forward pass
            bitmask, mask_rows, errors, pending = None, None, {}, ()
            if self._grammar_rids:             # no per-row work at all without constrained requests
                bitmask, mask_rows, errors, pending = self.grammars.fill([s.grammar for s in sample_states])
            if sample_rows == list(range(logits.shape[0])):
                picked = logits             # every row samples (decode): no [rows, V] gather copy; the
                # sampler copies before it edits any logit
            else:
                picked = logits[torch.tensor(sample_rows, device=logits.device)]
            res = self.sampler.sample(picked, sample_states, bitmask, mask_rows)
            for j, (i, r) in enumerate(zip(sample_idx, res)):
                st = out[i]
                seq = self.seqs[st.rid]
                if j in pending:                 # grammar still compiling: repeat this step later
                    st.deferred = True
                    continue
                g = seq.sampling.grammar
                err = errors.get(j)
                if err is None and g is not None and g.matcher is not None:
                    err = self.grammars.accept(g, r.token_ids[0])
                if err is not None:
                    st.error = err
                    continue
                st.token_ids = r.token_ids
                st.logprobs = r.logprobs
                st.top_logprobs = r.top_logprobs
                for t in r.token_ids:
                    seq.token_ids.append(t)
                    seq.sampling.record(t)
        if self.drafter is not None and self._step_hidden is not None:
            self._draft_next(scheduled, rows, accepted, out)
        return out

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Soft-capped logits of every position of one sequence: [n, V] fp32. Uses pages from the
        start of each pool, so call it only while no request is running (tests, offline scoring)."""
        if self.seqs:
            raise RuntimeError("score() needs an idle runner")
        if self.tp.size > 1:
            raise RuntimeError("score() runs on one rank only (--tp 1)")
        n = len(token_ids)
        pages = {}
        for spec in self.pool_specs:
            need = (n + spec.page_size - 1) // spec.page_size
            if need > spec.num_pages:
                raise ValueError(f"sequence of {n} tokens does not fit the {spec.name} pool")
            pages[spec.name] = list(range(need))
        from gemma4rt.protocol import SamplingParams
        rid = "__score__"
        self._add(NewRequestData(rid=rid, token_ids=list(token_ids), num_prompt_tokens=n,
                                 sampling=SamplingParams(), pages=pages))
        try:
            sr = ScheduledRequest(rid=rid, start=0, num_tokens=n, new_pages={}, sample=False)
            ctx, _ = self._build_context([sr])
            ctx.logits_indices = torch.arange(n, device=self.device)
            return self.model.compute_logits(self.model(ctx))
        finally:
            self._drop(rid)


_MSG_ENCODER = msgspec.msgpack.Encoder()
_PLAN_DECODER = msgspec.msgpack.Decoder(Optional[StepPlan])
_TOKENS_DECODER = msgspec.msgpack.Decoder(list[list[int]])


def _broadcast(obj, tp: TP, decoder=_PLAN_DECODER):
    """Rank 0's `obj` (a step plan or None, or with _TOKENS_DECODER one token list per request) on every
    rank of the tensor-parallel group: msgpack-encoded once (~15 µs for a 100-request plan, pickle took
    ~120) and written to one pipe per rank. gloo's broadcast_object_list, the fallback when the ranks have no
    pipes, took ~0.6–0.8 ms per message on a 2-core host, twice a step on the critical path."""
    if tp.pipe is None:
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=tp.ctrl)
        return box[0]
    if tp.rank == 0:
        data = _MSG_ENCODER.encode(obj)
        for conn in tp.pipe:
            conn.send_bytes(data)
        return obj
    return decoder.decode(tp.pipe.recv_bytes())
