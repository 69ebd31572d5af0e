"""Image and audio parts of chat requests: collect, fetch, preprocess, expand the prompt.

    media = MediaInput.for_server(model_info, engine_cfg, server_cfg)      # None: a text-only model
    parts = collect_parts(messages)          # also rewrites the parts into the template's form
    loaded = await media.load(parts)         # fetched and decoded concurrently; MediaError -> 400
    ids, items = await media.expand(prompt_ids, loaded)

Every failure names the part (`messages[i].content[j]`) and is a 400; the server goes on.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Optional

from gemma4rt.frontend.errors import bad_request
from gemma4rt.frontend.mm_fetch import FetchPolicy, LoadedMedia, MediaError, load_part
from gemma4rt.frontend.mm_preprocess import MEDIA_TOKEN_TEXT, MediaPreprocessor

log = logging.getLogger(__name__)
IMAGE_PARTS = {"image_url", "input_image", "image"}
AUDIO_PARTS = {"audio_url", "input_audio", "audio"}
VIDEO_PARTS = {"video_url", "video"}
MEDIA_PARTS = IMAGE_PARTS | AUDIO_PARTS | VIDEO_PARTS
VIDEO_PLACEHOLDER = MEDIA_TOKEN_TEXT["video_token_id"]


@dataclass
class MediaPart:
    where: str            # "messages[i].content[j]"
    part: dict            # the part as the client sent it
    modality: str         # "image" | "audio" | "video"


def collect_parts(messages: list[dict]) -> list[MediaPart]:
    """The media parts of all messages in prompt order. Each media part in `messages` is replaced by
    `{"type": "image"}` / `{"type": "audio"}`, the form chat templates render as one placeholder."""
    out: list[MediaPart] = []
    for i, m in enumerate(messages):
        c = m.get("content")
        if not isinstance(c, list):
            continue
        new = []
        for j, p in enumerate(c):
            t = p.get("type")
            if t in MEDIA_PARTS:
                mod = "image" if t in IMAGE_PARTS else "audio" if t in AUDIO_PARTS else "video"
                out.append(MediaPart(f"messages[{i}].content[{j}]", p, mod))
                p = {"type": mod}
            new.append(p)
        m["content"] = new
    return out


def _adopt_tokenizer_ids(pre, tokenizer) -> None:
    """With a tokenizer that is not the checkpoint's (a dummy real-size model served with the demo
    tokenizer), find the placeholders by the tokenizer's own ids. The model places soft tokens by
    offset, so the ids at those positions do not matter to it."""
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in MEDIA_TOKEN_TEXT.items()}
    if ids["image_token_id"] == pre.ids.get("image_token_id") or any(
            v is None or v == tokenizer.unk_token_id for v in ids.values()):
        return
    log.warning("the tokenizer's media token ids differ from the model config's: using the tokenizer's")
    pre.ids.update(ids)


class MediaInput:
    def __init__(self, pre, policy: FetchPolicy, limits: dict):
        self.pre = pre
        self.policy = policy
        self.limits = dict(limits)

    @classmethod
    def for_server(cls, model_info, eng_cfg, srv, tokenizer=None) -> Optional["MediaInput"]:
        if not (model_info.has_vision or model_info.has_audio):
            return None
        budget = (srv.mm_processor_kwargs or {}).get("max_soft_tokens")
        path = model_info.model_path
        if path and os.path.isfile(os.path.join(path, "config.json")):
            pre = MediaPreprocessor.from_model_dir(path, budget)
        else:                                   # --load-format dummy with a built-in geometry
            from gemma4rt.configs import lookup_builtin_config
            cfg = lookup_builtin_config(eng_cfg.model_path or "")
            if cfg is None:
                return None
            pre = MediaPreprocessor(cfg, None, budget)
        if tokenizer is not None:
            _adopt_tokenizer_ids(pre, tokenizer)
        policy = FetchPolicy(timeout_s=srv.media_fetch_timeout, max_bytes=srv.max_media_bytes,
                             allow_private=srv.allow_private_media_urls)
        return cls(pre, policy, srv.limit_mm_per_prompt)

    def _check(self, parts: list[MediaPart]) -> None:
        for p in parts:
            ok = self.pre.has_audio if p.modality == "audio" else self.pre.has_vision
            if not ok:
                raise bad_request(f"{p.where}: this model does not accept {p.modality} input.", param="messages")
        for mod in ("image", "audio", "video"):
            n = sum(1 for p in parts if p.modality == mod)
            lim = self.limits.get(mod)
            if lim is not None and n > lim:
                raise bad_request(f"The request carries {n} {mod} items; this server takes at most {lim} per "
                                  f"prompt (--limit-mm-per-prompt).", param="messages")

    async def load(self, parts: list[MediaPart]) -> list[LoadedMedia]:
        self._check(parts)

        async def one(k: int, p: MediaPart) -> LoadedMedia:
            try:
                m = await load_part(p.part, k, self.policy)
            except MediaError as e:
                raise bad_request(f"{p.where}: {e.message}", param="messages")
            if m is None:
                raise bad_request(f"{p.where}: unsupported content part.", param="messages")
            return m
        tasks = [asyncio.ensure_future(one(k, p)) for k, p in enumerate(parts)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    async def expand(self, prompt_text: str, prompt_ids: list[int], media: list[LoadedMedia],
                     parts: list[MediaPart], encode) -> tuple[list[int], list]:
        """(expanded prompt ids, MultimodalItems); preprocessing runs off the event loop. Videos are
        expanded in the prompt text (their frames' time stamps are text), which `encode` turns into
        ids again; images and audio are expanded on the ids."""
        def work():
            ids, frames = prompt_ids, []
            videos = [m for m in media if m.modality == "video"]
            if videos:
                text, pos = prompt_text, 0
                for m in videos:                  # left to right: a replacement holds <|video|> too
                    items, repl = self.pre.video_items(m)
                    at = text.find(VIDEO_PLACEHOLDER, pos)
                    if at < 0:
                        raise MediaError("the prompt has fewer video placeholders than video parts")
                    text = text[:at] + repl + text[at + len(VIDEO_PLACEHOLDER):]
                    pos = at + len(repl)
                    frames += items
                if text.find(VIDEO_PLACEHOLDER, pos) >= 0:
                    raise MediaError("the prompt has more video placeholders than video parts")
                ids = encode(text)
            exp = self.pre.expand_prompt(ids, media)
            if frames:
                self.pre.place_video_items(exp.token_ids, frames)
            items = sorted(exp.mm_items + frames, key=lambda it: it.offset)
            return exp.token_ids, items
        try:
            return await asyncio.to_thread(work)
        except MediaError as e:
            where = parts[e.part_index].where + ": " if e.part_index is not None else ""
            raise bad_request(f"{where}{e.message}", param="messages")
