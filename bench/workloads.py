"""Synthetic workloads for bench/serving.py; nothing is downloaded.

* `random_lengths`: SGLang bench_serving's length recipe (performance-targets.md §2.4). With the RNG
  seeded by `seed` (the same stream as `np.random.seed(seed)`), input lengths are drawn first, then
  output lengths, each uniform on the integers [max(floor(L*r), 1), L]. Defaults L=1024, r=0.0, seed 1
  give the cookbook totals (10 prompts: 6,101 in / 4,220 out; 1000 prompts: 512,842 / 510,855).
* prompt content: synthetic token ids `low + (offset_i + i + j) % (high - low)` with one random offset per
  request (drawn after the lengths, so the lengths stay exact), sent as ids, decoded to text with a
  tokenizer, or (no tokenizer, chat route) a string of common words of about the right token count.
* `image`: the cookbook image workload: N synthetic images per request (PNG data URIs) plus a text part
  whose token count and the output lengths follow the same recipe (cookbook: 128 in, 1024 out).
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

DEFAULT_TOKEN_RANGE = (1000, 100000)    # well inside Gemma's 262,144 vocab, clear of special ids

RESOLUTIONS = {"4k": (3840, 2160), "1080p": (1920, 1080), "720p": (1280, 720), "480p": (854, 480),
               "360p": (640, 360)}

_WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know get through back much before go good new write our used me "
    "man too any day same right look think also around another came come work three word must because "
    "does part even place well such here take why things help put years different away again off went "
    "old number great tell men say small every found still between name should home big give air line "
    "set own under read last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house don world going want school"
).split()


@dataclass
class BenchRequest:
    """One benchmark request. prompt_len: the dataset's input length (text tokens; SGLang-compatible
    totals); output_len: max new tokens asked for. Exactly one of input_ids / text is the prompt."""

    prompt_len: int
    output_len: int
    input_ids: Optional[list[int]] = None
    text: Optional[str] = None
    images: list[str] = field(default_factory=list)    # data URIs


def random_lengths(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                   rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """SGLang's recipe: inputs then outputs, each uniform on [max(floor(L*r), 1), L]."""
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    in_lo = max(int(input_len * range_ratio), 1)
    out_lo = max(int(output_len * range_ratio), 1)
    input_lens = rng.randint(in_lo, input_len + 1, size=num_prompts)
    output_lens = rng.randint(out_lo, output_len + 1, size=num_prompts)
    return input_lens, output_lens


def synthetic_ids(offset: int, index: int, length: int, low: int, high: int) -> list[int]:
    span = high - low
    return [int(low + (offset + index + j) % span) for j in range(length)]


def word_text(rng: np.random.RandomState, num_words: int) -> str:
    picks = rng.randint(0, len(_WORDS), size=max(1, num_words))
    return " ".join(_WORDS[i] for i in picks)


def ids_to_text(tokenizer, ids: list[int], target_len: int, low: int, high: int) -> tuple[str, int]:
    """Decode ids to text whose re-encoding has about target_len tokens (a few rounds of
    decode/re-encode/trim-or-extend, as vLLM's random dataset does). Returns (text, encoded length)."""
    cur = list(ids)
    text, n = "", 0
    for _ in range(8):
        text = tokenizer.decode(cur, skip_special_tokens=True)
        enc = tokenizer.encode(text, add_special_tokens=False)
        n = len(enc)
        if n == target_len:
            break
        if n > target_len:
            cur = enc[:target_len]
        else:
            more = synthetic_ids(cur[-1] if cur else 0, 1, target_len - n, low, high)
            cur = enc + more
    return text, n


def token_range(tokenizer, requested: Optional[tuple[int, int]]) -> tuple[int, int]:
    """The id range to draw from: the requested one, clamped to the tokenizer's vocabulary."""
    low, high = requested or DEFAULT_TOKEN_RANGE
    if tokenizer is not None:
        vocab = len(tokenizer)
        high = min(high, vocab)
        low = min(low, max(0, high - 16))
    if high - low < 1:
        raise ValueError(f"empty token id range [{low}, {high})")
    return low, high


def sample_random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                           seed: int = 1, *, mode: str = "ids", tokenizer=None,
                           id_range: Optional[tuple[int, int]] = None) -> list[BenchRequest]:
    """mode: "ids" (token ids), "text" (ids decoded with `tokenizer`), "words" (plain words)."""
    rng = np.random.RandomState(seed)
    input_lens, output_lens = random_lengths(num_prompts, input_len, output_len, range_ratio, rng)
    low, high = token_range(tokenizer, id_range)
    offsets = rng.randint(0, high - low, size=num_prompts)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    out = []
    for i in range(num_prompts):
        L, O = int(input_lens[i]), int(output_lens[i])
        if mode == "words":
            out.append(BenchRequest(prompt_len=L, output_len=O, text=word_text(rng, L)))
            continue
        ids = synthetic_ids(int(offsets[i]), i, L, low, high)
        if special:
            ids = [t if t not in special else low for t in ids]
        if mode == "text":
            if tokenizer is None:
                raise ValueError("text prompts need --tokenizer")
            text, _ = ids_to_text(tokenizer, ids, L, low, high)
            out.append(BenchRequest(prompt_len=L, output_len=O, text=text))
        else:
            out.append(BenchRequest(prompt_len=L, output_len=O, input_ids=ids))
    return out


# ---------------------------------------------------------------------------------------------- images
def parse_resolution(res: str) -> tuple[int, int]:
    """'720p' -> (1280, 720); 'HxW' (SGLang's custom form, height first) -> (W, H)."""
    if res in RESOLUTIONS:
        return RESOLUTIONS[res]
    try:
        h, w = (int(x) for x in res.lower().split("x"))
    except ValueError:
        raise ValueError(f"unknown --image-resolution {res!r} (use {', '.join(RESOLUTIONS)} or HxW)") from None
    return w, h


def make_png(rng: np.random.RandomState, width: int, height: int, content: str = "blocks") -> bytes:
    """A synthetic RGB PNG. "blocks": random 16x16-pixel tiles (every image distinct, small to send);
    "noise": random pixels (largest payload); "blank": one random flat colour."""
    from PIL import Image

    if content == "noise":
        arr = rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    elif content == "blank":
        arr = np.empty((height, width, 3), dtype=np.uint8)
        arr[:] = rng.randint(0, 256, size=3, dtype=np.uint8)
    elif content == "blocks":
        tile = 16
        low = rng.randint(0, 256, size=(-(-height // tile), -(-width // tile), 3), dtype=np.uint8)
        arr = np.repeat(np.repeat(low, tile, axis=0), tile, axis=1)[:height, :width]
    else:
        raise ValueError(f"unknown image content {content!r}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def sample_image_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                          seed: int = 1, *, image_count: int = 2, resolution: str = "720p",
                          content: str = "blocks", tokenizer=None,
                          id_range: Optional[tuple[int, int]] = None) -> list[BenchRequest]:
    """Text part and output lengths by the random recipe; `image_count` distinct images each."""
    width, height = parse_resolution(resolution)
    mode = "text" if tokenizer is not None else "words"
    reqs = sample_random_requests(num_prompts, input_len, output_len, range_ratio, seed, mode=mode,
                                  tokenizer=tokenizer, id_range=id_range)
    img_rng = np.random.RandomState(seed + 7919)
    for r in reqs:
        r.images = [png_data_uri(make_png(img_rng, width, height, content)) for _ in range(image_count)]
    return reqs
