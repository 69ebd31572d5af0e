"""Decoded media → MultimodalItems, and the prompt expansion of their placeholders.

    pre = MediaPreprocessor.from_model_dir(model_dir, default_image_tokens=None)   # None: checkpoint's default
    expanded = await asyncio.to_thread(pre.expand_prompt, token_ids, media)   # CPU work: off the event loop
    AddRequest(prompt_token_ids=expanded.token_ids, mm_items=expanded.mm_items, ...)

The chat template emits one placeholder per media part (`<|image|>`, `<|audio|>`); `expand_prompt` replaces
the k-th image placeholder by `<|image>` + N×`<|image|>` + `<image|>` and the k-th audio placeholder by
`<|audio>` + N×`<|audio|>` + `<audio|>` (N = the item's soft tokens), and returns one MultimodalItem per
media with `offset` = index of its first soft-token placeholder in the expanded ids.

Preprocessing uses the checkpoint's own transformers processors (Gemma4ImageProcessorPil,
Gemma4AudioFeatureExtractor, Gemma4UnifiedAudioFeatureExtractor), configured from the checkpoint's
processor_config.json / preprocessor_config.json when present, else from the model config
(patch_size, pooling_kernel_size, mel bins = subsampling_conv_channels[0], samples per audio token).

MultimodalItem.arrays (name → (numpy dtype str, shape, raw bytes)); padding rows are stripped:
  image (ViT models)    pixel_values        float32 [n_patches, 3·p²]   in [0, 1], (row, col, channel) per patch
                        image_position_ids  int32   [n_patches, 2]      (x = column, y = row) on the patch grid
  image (unified 12B)   pixel_values        float32 [n_soft, 3·(k·p)²]  merged k×k model patches, same layout
                        image_position_ids  int32   [n_soft, 2]         (x, y) on the merged grid
  audio (E2B/E4B)       input_features      float32 [T, n_mels]         log-mel frames (Gemma4AudioFeatureExtractor)
                        input_features_mask bool    [T]                 True = valid frame
  audio (unified 12B)   input_features      float32 [n_soft, 640]       raw 16 kHz samples, 640 per token
                        input_features_mask bool    [n_soft]
content_hash = sha256(modality, media bytes digest, budget); images on "vision"-bidirectional models are
marked `bidirectional=True`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from gemma4rt.frontend.mm_fetch import AUDIO_SAMPLE_RATE, LoadedMedia, MediaError
from gemma4rt.protocol import MultimodalItem

IMAGE_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
# Gemma 4's media tokens as text, by the config field that holds each one's id
MEDIA_TOKEN_TEXT = {"image_token_id": "<|image|>", "audio_token_id": "<|audio|>", "video_token_id": "<|video|>",
                    "boi_token_id": "<|image>", "eoi_token_id": "<image|>", "boa_token_id": "<|audio>",
                    "eoa_token_id": "<audio|>"}
MAX_AUDIO_SAMPLES = 480_000          # 30 s at 16 kHz (the feature extractor's truncation)


def pack_array(a: np.ndarray) -> tuple[str, list[int], bytes]:
    a = np.ascontiguousarray(a)
    return (a.dtype.str, list(a.shape), a.tobytes())


@dataclass
class ExpandedPrompt:
    token_ids: list[int]
    mm_items: list[MultimodalItem]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class MediaPreprocessor:
    def __init__(self, config: dict, processor_config: Optional[dict] = None,
                 default_image_tokens: Optional[int] = None):
        pc = processor_config or {}
        if default_image_tokens is None:      # server flag > processor config > config.json > 280
            default_image_tokens = int((pc.get("image_processor") or {}).get("max_soft_tokens")
                                       or config.get("vision_soft_tokens_per_image") or 280)
        if default_image_tokens not in IMAGE_TOKEN_BUDGETS:
            raise ValueError(f"image soft-token budget must be one of {IMAGE_TOKEN_BUDGETS}")
        self.config = config
        self.default_image_tokens = default_image_tokens
        self.unified = str(config.get("model_type", "")).startswith("gemma4_unified")
        text = config.get("text_config") or {}
        self.bidirectional = text.get("use_bidirectional_attention") == "vision"
        self.vision = config.get("vision_config")
        self.audio = config.get("audio_config")
        ids = {k: config.get(k) for k in ("boi_token_id", "eoi_token_id", "image_token_id", "boa_token_id",
                                          "audio_token_id")}
        ids["eoa_token_id"] = config.get("eoa_token_id", config.get("eoa_token_index"))
        ids["video_token_id"] = config.get("video_token_id")
        self.ids = ids
        self._image_proc = None
        self._audio_fe = None
        self._image_kwargs = dict(pc.get("image_processor") or {})
        self._audio_kwargs = dict(pc.get("feature_extractor") or {})

    @classmethod
    def from_model_dir(cls, model_dir: str, default_image_tokens: Optional[int] = None) -> "MediaPreprocessor":
        cfg = _read_json(os.path.join(model_dir, "config.json"))
        pc = _read_json(os.path.join(model_dir, "processor_config.json"))
        pre = _read_json(os.path.join(model_dir, "preprocessor_config.json"))
        if pre and "image_processor" not in pc:
            pc = {**pc, "image_processor": pre}
        return cls(cfg, pc, default_image_tokens)

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    # ---------------------------------------------------------------- images
    def _image_processor(self):
        if self._image_proc is None:
            from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
            v = self.vision or {}
            keep = {k: self._image_kwargs[k] for k in ("patch_size", "pooling_kernel_size", "resample",
                                                       "do_rescale", "rescale_factor") if k in self._image_kwargs}
            kw = {"patch_size": int(v.get("patch_size", 16)), "pooling_kernel_size": int(v.get("pooling_kernel_size", 3)),
                  **keep}
            self._image_proc = Gemma4ImageProcessorPil(**kw)
        return self._image_proc

    def image_arrays(self, image, max_soft_tokens: int) -> tuple[dict, int]:
        """RGB PIL image → (arrays, number of soft tokens)."""
        proc = self._image_processor()
        out = proc(images=[image], max_soft_tokens=max_soft_tokens, return_tensors="np")
        pix = np.asarray(out["pixel_values"][0], dtype=np.float32)
        pos = np.asarray(out["image_position_ids"][0]).astype(np.int32)
        real = (pos != -1).all(axis=-1)
        pix, pos = pix[real], pos[real]
        limit = int((self.vision or {}).get("position_embedding_size", 10240))
        if not self.unified and pos.size and int(pos.max()) >= limit:
            raise MediaError(f"the image is too elongated for this model ({image.width}x{image.height} px gives "
                             f"{int(pos.max()) + 1} patches along one side; at most {limit})")
        k = proc.pooling_kernel_size
        if self.unified:
            pix, pos = merge_patches(pix, pos, k, proc.patch_size)
            n = pix.shape[0]
        else:
            n = pix.shape[0] // (k * k)
        return {"pixel_values": pack_array(pix), "image_position_ids": pack_array(pos)}, n

    # ---------------------------------------------------------------- audio
    def _feature_extractor(self):
        if self._audio_fe is None:
            a = self.audio or {}
            kw = {k: v for k, v in self._audio_kwargs.items() if k not in ("feature_extractor_type", "processor_class")}
            if self.unified:
                from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
                    Gemma4UnifiedAudioFeatureExtractor)
                n = int(a.get("output_proj_dims") or a.get("audio_embed_dim") or 640)
                kw.setdefault("feature_size", n)
                kw.setdefault("audio_samples_per_token", n)
                self._audio_fe = Gemma4UnifiedAudioFeatureExtractor(**kw)
            else:
                from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
                kw.setdefault("feature_size", int((a.get("subsampling_conv_channels") or [128])[0]))
                self._audio_fe = Gemma4AudioFeatureExtractor(**kw)
        return self._audio_fe

    def audio_arrays(self, waveform: np.ndarray) -> tuple[dict, int]:
        """16 kHz mono float32 [S] → (arrays, number of soft tokens). The caller refuses clips over 30 s."""
        w = np.asarray(waveform, dtype=np.float32)
        fe = self._feature_extractor()
        if self.unified:
            out = fe([w], return_tensors="np")
            mask = np.asarray(out["input_features_mask"][0], dtype=bool)
            feats = np.asarray(out["input_features"][0], dtype=np.float32)[mask]
            mask = mask[mask]
            n = int(mask.sum())
        else:
            out = fe([w], sampling_rate=AUDIO_SAMPLE_RATE, return_tensors="np")
            feats = np.asarray(out["input_features"][0], dtype=np.float32)
            mask = np.asarray(out["input_features_mask"][0], dtype=bool)
            n = int(mask[::2][::2].sum())
        return {"input_features": pack_array(feats), "input_features_mask": pack_array(mask)}, n

    # ---------------------------------------------------------------- items and prompt
    def make_item(self, media: LoadedMedia) -> tuple[MultimodalItem, int]:
        """LoadedMedia → (item with offset 0, soft tokens)."""
        if media.modality == "image":
            if not self.has_vision:
                raise MediaError("this model does not accept image input", media.part_index)
            budget = media.max_soft_tokens or self.default_image_tokens
            if budget not in IMAGE_TOKEN_BUDGETS:
                raise MediaError(f"max_soft_tokens must be one of {IMAGE_TOKEN_BUDGETS}, got {budget}", media.part_index)
            try:
                arrays, n = self.image_arrays(media.data, budget)
            except MediaError as e:
                if e.part_index is None:
                    e.part_index = media.part_index
                raise
            except Exception as exc:
                raise MediaError(f"cannot preprocess image ({type(exc).__name__}: {exc})", media.part_index) from None
            key = f"image:{media.digest}:{budget}"
            bidir = self.bidirectional
        elif media.modality == "audio":
            if not self.has_audio:
                raise MediaError("this model does not accept audio input", media.part_index)
            if len(media.data) > MAX_AUDIO_SAMPLES:
                raise MediaError(f"the audio clip lasts {len(media.data) / AUDIO_SAMPLE_RATE:.1f} s; this model takes "
                                 f"at most {MAX_AUDIO_SAMPLES // AUDIO_SAMPLE_RATE} s per clip (split it into "
                                 f"several parts)", media.part_index)
            arrays, n = self.audio_arrays(media.data)
            if n == 0:
                raise MediaError("audio clip is too short", media.part_index)
            key, bidir = f"audio:{media.digest}", False
        else:
            raise MediaError(f"unsupported modality {media.modality!r}", media.part_index)
        h = hashlib.sha256(key.encode()).hexdigest()
        return MultimodalItem(modality=media.modality, offset=0, num_tokens=n, content_hash=h,
                              bidirectional=bidir, arrays=arrays), n

    # ---------------------------------------------------------------- video
    def video_items(self, media: LoadedMedia) -> tuple[list[MultimodalItem], str]:
        """A decoded video (mm_video.VideoFrames) → one item per frame (offsets unset) and the text
        that replaces its `<|video|>` placeholder: per frame `mm:ss <|image>` + N x `<|video|>` +
        `<image|>`, joined by spaces (transformers' processing_gemma4)."""
        from gemma4rt.frontend.mm_video import timestamp
        if not self.has_vision:
            raise MediaError("this model does not accept video input", media.part_index)
        v = media.data
        budget = media.max_soft_tokens or 70
        items, pieces = [], []
        for k, (frame, t) in enumerate(zip(v.frames, v.timestamps)):
            try:
                arrays, n = self.image_arrays(frame, budget)
            except MediaError as e:
                raise MediaError(f"frame {k}: {e.message}", media.part_index) from None
            h = hashlib.sha256(f"video:{media.digest}:{k}:{budget}".encode()).hexdigest()
            items.append(MultimodalItem(modality="video", offset=0, num_tokens=n, content_hash=h,
                                        bidirectional=self.bidirectional, arrays=arrays))
            T = MEDIA_TOKEN_TEXT
            pieces.append(f"{timestamp(t)} {T['boi_token_id']}{T['video_token_id'] * n}{T['eoi_token_id']}")
        return items, " ".join(pieces)

    def place_video_items(self, token_ids: list[int], items: list[MultimodalItem]) -> None:
        """Set each frame item's offset to its run of video tokens in the expanded prompt."""
        vid = self.ids["video_token_id"]
        runs, i, n = [], 0, len(token_ids)
        while i < n:
            if token_ids[i] == vid:
                j = i
                while j < n and token_ids[j] == vid:
                    j += 1
                runs.append((i, j - i))
                i = j
            else:
                i += 1
        if [r[1] for r in runs] != [it.num_tokens for it in items]:
            raise MediaError(f"the prompt's video token runs {[r[1] for r in runs]} do not match the frames' "
                             f"{[it.num_tokens for it in items]} soft tokens")
        for it, (off, _) in zip(items, runs):
            it.offset = off

    def expand_prompt(self, token_ids: list[int], media: list[LoadedMedia]) -> ExpandedPrompt:
        """Replace the template's placeholders (one `<|image|>` / `<|audio|>` per media, in order) by the
        full spans, and return the expanded ids with the items (offsets set)."""
        img_id, aud_id = self.ids["image_token_id"], self.ids["audio_token_id"]
        media = [m for m in media if m.modality != "video"]        # videos were expanded as text
        queues = {"image": [m for m in media if m.modality == "image"],
                  "audio": [m for m in media if m.modality == "audio"]}
        n_img = sum(1 for t in token_ids if t == img_id)
        n_aud = sum(1 for t in token_ids if t == aud_id)
        if n_img != len(queues["image"]) or n_aud != len(queues["audio"]):
            raise MediaError(f"the prompt has {n_img} image and {n_aud} audio placeholders but the request "
                             f"carries {len(queues['image'])} images and {len(queues['audio'])} audio clips")
        out: list[int] = []
        items: list[MultimodalItem] = []
        pos = {"image": 0, "audio": 0}
        for t in token_ids:
            kind = "image" if t == img_id else "audio" if t == aud_id else None
            if kind is None:
                out.append(t)
                continue
            m = queues[kind][pos[kind]]
            pos[kind] += 1
            item, n = self.make_item(m)
            begin, end = ((self.ids["boi_token_id"], self.ids["eoi_token_id"]) if kind == "image"
                          else (self.ids["boa_token_id"], self.ids["eoa_token_id"]))
            out.append(begin)
            item.offset = len(out)
            out.extend([t] * n)
            out.append(end)
            items.append(item)
        return ExpandedPrompt(out, items)


def merge_patches(pix: np.ndarray, pos: np.ndarray, k: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Unified 12B: teacher patches [H·W, p·p·3] on a row-major grid → merged k×k model patches
    [(H/k)·(W/k), (k·p)²·3] laid out (row, col, channel) over the k·p × k·p pixels, positions (x, y) of
    the merged grid, in row-major merged-grid order."""
    W = int(pos[:, 0].max()) + 1
    H = int(pos[:, 1].max()) + 1
    grid = np.zeros((H, W, p, p, 3), dtype=pix.dtype)
    grid[pos[:, 1], pos[:, 0]] = pix.reshape(-1, p, p, 3)
    g = grid.reshape(H // k, k, W // k, k, p, p, 3).transpose(0, 2, 1, 4, 3, 5, 6)
    merged = g.reshape((H // k) * (W // k), (k * p) * (k * p) * 3)
    ys, xs = np.meshgrid(np.arange(H // k), np.arange(W // k), indexing="ij")
    mpos = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1).astype(np.int32)
    return merged, mpos


__all__ = ["MediaPreprocessor", "ExpandedPrompt", "IMAGE_TOKEN_BUDGETS", "merge_patches", "pack_array"]
