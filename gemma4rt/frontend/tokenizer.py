"""The tokenizer side of the front door: HF tokenizer, chat template, encode/decode in a thread pool."""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from gemma4rt.frontend.errors import bad_request

log = logging.getLogger(__name__)
THREAD_POOL_MIN_CHARS = 2048      # shorter texts are tokenized inline (cheaper than a thread hop)


class TokenizerManager:
    def __init__(self, path: str, chat_template: Optional[str] = None, bos_token_id: Optional[int] = None,
                 num_threads: int = 2):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(path)
        if chat_template:
            with open(chat_template, encoding="utf-8") as f:
                self.tok.chat_template = f.read()
        elif not getattr(self.tok, "chat_template", None):
            p = os.path.join(path, "chat_template.jinja")
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as f:
                    self.tok.chat_template = f.read()
        self.tok.model_max_length = 1 << 40      # the server checks lengths against the model's context
        self.bos_token_id = bos_token_id if bos_token_id is not None else self.tok.bos_token_id
        self.pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="tokenize")
        self.vocab_size = len(self.tok)
        from gemma4rt.parsers.events import CHANNEL_END, CHANNEL_START, STRING_DELIM, TOOL_CALL_END, TOOL_CALL_START
        ids = [self.tok.convert_tokens_to_ids(t) for t in (CHANNEL_START, CHANNEL_END)]
        # (`<|channel>`, `<channel|>`) ids of the thought channel, None if the tokenizer lacks them
        self.channel_ids = tuple(ids) if all(i is not None and i != self.tok.unk_token_id for i in ids) else None
        # special tokens (those skip_special_tokens leaves out of text), and the ones among them that are no
        # text for the user even with the output parsers on (`<turn|>`, `<eos>`, `<|tool_response>`, ...):
        # the parsers' own tags (thought channel, tool call, string delimiter) are not among those
        special = {i for i, t in getattr(self.tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        special.update(getattr(self.tok, "all_special_ids", []))
        self.special_ids = frozenset(special)
        keep = {CHANNEL_START, CHANNEL_END, TOOL_CALL_START, TOOL_CALL_END, STRING_DELIM}
        self.control_ids = frozenset(i for i in special if self.tok.convert_ids_to_tokens(i) not in keep)
        self._piece_cache: dict[int, str] = {}

    async def _run(self, fn, *args, big: bool = True):
        if not big:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- encode ------------------------------------------------------------------------------
    def _encode(self, text: str, add_bos: bool) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    async def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return await self._run(self._encode, text, add_bos, big=len(text) >= THREAD_POOL_MIN_CHARS)

    def _render(self, messages, tools, kwargs) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise bad_request("This model has no chat template; use /v1/completions or pass --chat-template.")
        try:
            return self.tok.apply_chat_template(messages, tools=tools or None, tokenize=False, **kwargs)
        except Exception as e:      # template raise_exception and friends are client mistakes
            raise bad_request(f"Cannot render the chat template: {e}", param="messages")

    async def render_chat(self, messages: list, tools: Optional[list], kwargs: dict) -> tuple[str, list[int]]:
        def work():
            text = self._render(messages, tools, kwargs)
            return text, self.tok.encode(text, add_special_tokens=False)
        return await self._run(work, big=True)

    # -- decode ------------------------------------------------------------------------------
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def piece(self, token_id: int) -> str:
        """The text of one token (for logprob entries)."""
        s = self._piece_cache.get(token_id)
        if s is None:
            s = self.tok.decode([token_id], skip_special_tokens=False)
            self._piece_cache[token_id] = s
        return s

    def piece_bytes(self, token_id: int) -> list[int]:
        return list(self.piece(token_id).encode("utf-8", errors="replace"))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
