"""The offline API: `from gemma4rt import LLM, SamplingParams`.

    llm = LLM("path/to/gemma-4-E4B-it")            # or LLM() for the built-in demo model
    outs = llm.generate(["Hello"], SamplingParams(max_new_tokens=32, temperature=0))
    outs = llm.chat([{"role": "user", "content": "Hi"}])

Requests run through the same Engine (scheduler + model runner, continuous batching over the paged
KV cache) that the server's engine process runs, in this process.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from gemma4rt.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from gemma4rt.protocol import AddRequest, SamplingParams

PromptType = Union[str, Sequence[int]]


@dataclass
class GenerationOutput:
    """One request's result. logprobs / top_logprobs are filled when the sampling params asked."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    num_cached_tokens: int = 0
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


class LLM:
    def __init__(self, model_path: Optional[str] = None, *, device: str = "auto", dtype: str = "auto",
                 load_format: str = "auto", tokenizer_path: Optional[str] = None,
                 context_length: Optional[int] = None, max_running_requests: int = 64,
                 chunked_prefill_size: int = 2048, page_size: int = 16,
                 max_total_tokens: Optional[int] = None, disable_radix_cache: bool = False,
                 seed: int = 0, tp_size: int = 1, overlap_schedule: Optional[bool] = None,
                 engine_config: Optional[EngineConfig] = None):
        from gemma4rt.engine import Engine

        cfg = engine_config or EngineConfig(
            model_path=model_path, tokenizer_path=tokenizer_path, dtype=dtype, device=device,
            load_format=load_format, context_length=context_length, seed=seed,
            cache=CacheConfig(page_size=page_size, max_total_tokens=max_total_tokens,
                              disable_radix_cache=disable_radix_cache),
            scheduler=SchedulerConfig(max_running_requests=max_running_requests,
                                      chunked_prefill_size=chunked_prefill_size,
                                      overlap_schedule=overlap_schedule),
            parallel=ParallelConfig(tp=tp_size))
        self.engine = Engine(cfg)
        self._tokenizer = None
        self._ids = itertools.count()
        self._closed = False

    def close(self) -> None:
        """Stop the tensor-parallel ranks (tp_size > 1) and leave their process group, then give back this
        process's device memory (CUDA graphs, KV pools, weights), as SGLang's Engine.shutdown() does. The LLM
        cannot generate afterwards; a second close() does nothing."""
        if self._closed:
            return
        from gemma4rt.worker.tp_worker import free_runner_memory, stop_tp_runner
        self._closed = True
        stop_tp_runner(self.engine.runner)
        free_runner_memory(self.engine.runner)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.engine.tokenizer_path)
        return self._tokenizer

    @property
    def model_info(self):
        return self.engine.model_info

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: PromptType) -> list[int]:
        """Token ids of a prompt: lists of ints pass through; text gets <bos> unless it has one."""
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError("empty prompt")
            return ids
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        bos = self.model_info.bos_token_id
        if not ids or ids[0] != bos:
            ids = [bos] + ids
        return ids

    def apply_chat_template(self, messages: list[dict], *, tools: Optional[list] = None,
                            chat_template_kwargs: Optional[dict] = None, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **(chat_template_kwargs or {}))

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None
                 ) -> list[GenerationOutput]:
        """Generate for one prompt or many (text or token-id lists); all run batched."""
        if self._closed:
            raise RuntimeError("this LLM was closed: its weights and KV cache are freed")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]                                   # a single prompt
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        rids, results = [], {}
        for prompt, p in zip(prompts, params):
            ids = self.encode(prompt)
            rid = f"llm-{next(self._ids)}"
            err = self.engine.add_request(AddRequest(rid=rid, prompt_token_ids=ids, sampling=p))
            out = GenerationOutput(prompt_token_ids=ids, token_ids=[], text="", finish_reason=None)
            if err:
                out.finish_reason, out.error = "error", str(err)
            results[rid] = out
            rids.append(rid)
        pending = {r for r in rids if results[r].finish_reason is None}
        while pending:
            for o in self.engine.step().outputs:
                res = results.get(o.rid)
                if res is None:
                    continue
                res.token_ids.extend(o.new_token_ids)
                if o.logprobs is not None:
                    res.logprobs = (res.logprobs or []) + list(o.logprobs)
                if o.top_logprobs is not None:
                    res.top_logprobs = (res.top_logprobs or []) + [list(x) for x in o.top_logprobs]
                res.num_cached_tokens = max(res.num_cached_tokens, o.num_cached_tokens)
                if o.finish_reason is not None:
                    res.finish_reason, res.error = o.finish_reason, o.error
                    pending.discard(o.rid)
            if pending and not self.engine.has_work():
                for r in pending:
                    results[r].finish_reason, results[r].error = "error", "engine stopped with requests pending"
                break
        outs = [results[r] for r in rids]
        for o in outs:
            o.text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True) if o.token_ids else ""
        return outs

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None, *,
             tools: Optional[list] = None, chat_template_kwargs: Optional[dict] = None) -> list[GenerationOutput]:
        """Render each conversation with the checkpoint's own chat template and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode(self.apply_chat_template(c, tools=tools,
                                                                  chat_template_kwargs=chat_template_kwargs),
                                         add_special_tokens=False) for c in convs]
        return self.generate(prompts, sampling_params)
