"""Video parts (`video_url`, a data URI or URL): decoded with PyAV, up to 32 frames sampled uniformly
over the clip, each frame an RGB image with its time stamp. The frames then go through the image
preprocessing at 70 soft tokens each, and the prompt gets Gemma 4's video form (transformers'
processing_gemma4): per frame `mm:ss <|image>` + N x `<|video|>` + `<image|>`, frames joined by spaces.
"""
from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Optional

from gemma4rt.frontend.mm_fetch import MAX_IMAGE_PIXELS, FetchPolicy, LoadedMedia, MediaError, _digest, get_bytes

MAX_FRAMES = 32
VIDEO_FRAME_TOKENS = 70
DEFAULT_FPS = 24.0                    # when the container does not say (as transformers assumes)


@dataclass
class VideoFrames:
    frames: list                      # PIL RGB images
    timestamps: list[float]           # seconds


def _sample(n: int, k: int) -> list[int]:
    """k indices spread uniformly over range(n) (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return [int(i * n / k) for i in range(k)]


def decode_video(data: bytes, part_index: Optional[int] = None, max_frames: int = MAX_FRAMES) -> VideoFrames:
    try:
        import av
    except ImportError:
        raise MediaError("video input needs the `av` package (PyAV) on this server", part_index) from None
    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video:
                raise MediaError("the file has no video stream", part_index)
            vs = c.streams.video[0]
            fps = float(vs.average_rate) if vs.average_rate else DEFAULT_FPS
            times = []
            for f in c.decode(video=0):        # first pass: how many frames, and when
                times.append(float(f.time) if f.time is not None else len(times) / fps)
        if not times:
            raise MediaError("the video has no frames", part_index)
        keep = _sample(len(times), max_frames)
        wanted = set(keep)
        frames = []
        with av.open(io.BytesIO(data)) as c:
            for i, f in enumerate(c.decode(video=0)):
                if i in wanted:
                    if f.width * f.height > MAX_IMAGE_PIXELS:
                        raise MediaError(f"video frames of {f.width}x{f.height} pixels are too large", part_index)
                    frames.append(f.to_image().convert("RGB"))
                if len(frames) == len(keep):
                    break
    except MediaError:
        raise
    except Exception as exc:          # av.error.InvalidDataError and friends
        raise MediaError(f"cannot decode video ({type(exc).__name__}: {exc})", part_index) from None
    t0 = times[0]
    return VideoFrames(frames, [max(0.0, times[i] - t0) for i in keep[:len(frames)]])


async def load_video(url: str, policy: FetchPolicy, part_index: Optional[int] = None) -> LoadedMedia:
    data, _ = await get_bytes(url, policy, part_index)
    frames = await asyncio.to_thread(decode_video, data, part_index)
    return LoadedMedia("video", frames, _digest(data), part_index, VIDEO_FRAME_TOKENS)


def timestamp(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"
