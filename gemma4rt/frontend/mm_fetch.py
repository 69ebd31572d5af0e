"""Loading media parts of a chat request: images and audio from URLs, data URIs and base64.

    policy = FetchPolicy(timeout_s=10, max_bytes=20 << 20, max_redirects=3, allow_private=False)
    media = await load_part(part, part_index, policy)      # an OpenAI content part → LoadedMedia | None

`LoadedMedia.data` is an RGB `PIL.Image.Image` for images (first frame of an animation) and a 16 kHz mono
float32 numpy waveform for audio; `digest` is the sha256 of the source bytes. Any failure raises
`MediaError(message, part_index)`, which the front door turns into a 400 naming the part.

Network rules: http/https only; the host is resolved first and every address must be public (no private,
loopback, link-local, multicast, reserved or unspecified address) unless `allow_private=True` — the check
sits in the connector's resolver, so it also covers every redirect hop and the address actually dialled;
redirects are followed by hand up to `max_redirects`; the body is capped at `max_bytes` (Content-Length and
the streamed length) and the whole fetch at `timeout_s`.

Audio decoding: WAV (PCM 8/16/24/32-bit, IEEE float 32/64, WAVE_FORMAT_EXTENSIBLE) with the stdlib only; other
formats (mp3, flac, ogg) only when the optional `soundfile` package is installed, else a clear MediaError.
Resampling to 16 kHz is FFT-based (band-limited); channels are averaged.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urljoin, urlsplit

import numpy as np

AUDIO_SAMPLE_RATE = 16000
MAX_IMAGE_PIXELS = 64_000_000       # decoded size cap (a small PNG can expand to gigabytes)


class MediaError(ValueError):
    """A media part that cannot be loaded; `part_index` names the content part (None: unknown)."""

    def __init__(self, message: str, part_index: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.part_index = part_index

    def __str__(self) -> str:
        where = f"content part {self.part_index}: " if self.part_index is not None else ""
        return where + self.message


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 10.0
    max_bytes: int = 20 * 2**20
    max_redirects: int = 3
    allow_private: bool = False


@dataclass
class LoadedMedia:
    modality: str                  # "image" | "audio"
    data: Any                      # PIL.Image.Image (RGB) | np.ndarray float32 [S] at 16 kHz
    digest: str                    # sha256 hex of the source bytes
    part_index: Optional[int] = None
    max_soft_tokens: Optional[int] = None     # per-image budget requested by the client, if any


# ------------------------------------------------------------------------------------------ network


def _is_public(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return not (a.is_private or a.is_loopback or a.is_link_local or a.is_multicast or a.is_reserved
                or a.is_unspecified or (isinstance(a, ipaddress.IPv4Address) and a in _SHARED_NET))


_SHARED_NET = ipaddress.ip_network("100.64.0.0/10")     # carrier-grade NAT


def _make_resolver(allow_private: bool):
    import aiohttp
    from aiohttp.abc import AbstractResolver

    class PublicOnlyResolver(AbstractResolver):
        """Resolves like the default resolver, then refuses non-public addresses."""

        def __init__(self):
            self._inner = aiohttp.ThreadedResolver()

        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
            infos = await self._inner.resolve(host, port, family)
            if not allow_private:
                for info in infos:
                    if not _is_public(info["host"]):
                        raise _BlockedAddress(f"{host} resolves to a non-public address ({info['host']})")
            return infos

        async def close(self) -> None:
            await self._inner.close()

    return PublicOnlyResolver()


class _BlockedAddress(OSError):
    pass


def _check_url(url: str, part_index: Optional[int], allow_private: bool) -> None:
    u = urlsplit(url)
    if u.scheme not in ("http", "https"):
        raise MediaError(f"unsupported URL scheme {u.scheme!r} (use http, https or a data: URI)", part_index)
    if not u.hostname:
        raise MediaError("URL has no host", part_index)
    try:
        ipaddress.ip_address(u.hostname)
        literal = True
    except ValueError:
        literal = False
    if literal and not allow_private and not _is_public(u.hostname):
        raise MediaError(f"refusing to fetch from non-public address {u.hostname}", part_index)
    if not allow_private and u.hostname.lower() in ("localhost", "localhost.localdomain"):
        raise MediaError("refusing to fetch from localhost", part_index)


async def fetch_bytes(url: str, policy: FetchPolicy = FetchPolicy(), part_index: Optional[int] = None,
                      session=None) -> tuple[bytes, str]:
    """GET url under `policy` → (body, content type). Raises MediaError."""
    import aiohttp

    own = session is None
    if own:
        connector = aiohttp.TCPConnector(resolver=_make_resolver(policy.allow_private), use_dns_cache=False)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=policy.timeout_s))
    try:
        async with asyncio.timeout(policy.timeout_s):
            for _hop in range(policy.max_redirects + 1):
                _check_url(url, part_index, policy.allow_private)
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        loc = resp.headers.get("Location")
                        if not loc:
                            raise MediaError(f"redirect without Location from {url}", part_index)
                        url = urljoin(url, loc)
                        continue
                    if resp.status != 200:
                        raise MediaError(f"fetching {url} failed with HTTP {resp.status}", part_index)
                    n = resp.content_length
                    if n is not None and n > policy.max_bytes:
                        raise MediaError(f"media at {url} is {n} bytes, over the {policy.max_bytes}-byte limit",
                                         part_index)
                    buf = bytearray()
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        buf += chunk
                        if len(buf) > policy.max_bytes:
                            raise MediaError(f"media at {url} exceeds the {policy.max_bytes}-byte limit", part_index)
                    return bytes(buf), resp.headers.get("Content-Type", "")
            raise MediaError(f"too many redirects (more than {policy.max_redirects})", part_index)
    except MediaError:
        raise
    except (TimeoutError, asyncio.TimeoutError):
        raise MediaError(f"fetching {url} timed out after {policy.timeout_s:g} s", part_index) from None
    except _BlockedAddress as exc:
        raise MediaError(f"refusing to fetch: {exc}", part_index) from None
    except aiohttp.ClientConnectorError as exc:
        if isinstance(getattr(exc, "os_error", None), _BlockedAddress):
            raise MediaError(f"refusing to fetch: {exc.os_error}", part_index) from None
        raise MediaError(f"could not connect to fetch {url}: {exc}", part_index) from None
    except aiohttp.ClientError as exc:
        raise MediaError(f"fetching {url} failed: {type(exc).__name__}: {exc}", part_index) from None
    finally:
        if own:
            await session.close()


def parse_data_uri(uri: str, max_bytes: int, part_index: Optional[int] = None) -> tuple[bytes, str]:
    """data:[<mediatype>][;base64],<data> → (bytes, media type)."""
    head, sep, payload = uri.partition(",")
    if not sep or not head.startswith("data:"):
        raise MediaError("malformed data: URI", part_index)
    if len(payload) > max_bytes * 4 // 3 + 8:
        raise MediaError(f"data: URI payload is over the {max_bytes}-byte limit", part_index)
    meta = head[5:].split(";")
    if "base64" in meta[1:]:
        data = b64decode(payload, part_index)
    else:
        from urllib.parse import unquote_to_bytes
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise MediaError(f"data: URI payload is over the {max_bytes}-byte limit", part_index)
    return data, meta[0]


def b64decode(s: str, part_index: Optional[int] = None) -> bytes:
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("invalid base64 data", part_index) from None


async def get_bytes(url: str, policy: FetchPolicy, part_index: Optional[int] = None) -> tuple[bytes, str]:
    if url.startswith("data:"):
        return parse_data_uri(url, policy.max_bytes, part_index)
    return await fetch_bytes(url, policy, part_index)


# ------------------------------------------------------------------------------------------ decoding


def decode_image(data: bytes, part_index: Optional[int] = None):
    """PNG / JPEG / WebP / GIF (first frame) / anything PIL opens → RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.width < 1 or img.height < 1:
            raise MediaError("image has no pixels", part_index)
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise MediaError(f"image of {img.width}x{img.height} pixels is over the {MAX_IMAGE_PIXELS}-pixel limit",
                             part_index)
        img.seek(0)
        img.load()
        if img.mode in ("RGBA", "LA", "P", "PA"):
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        return img.convert("RGB")
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MediaError(f"cannot decode image ({type(exc).__name__}: {exc})", part_index) from None


def _parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """RIFF/WAVE → (samples [S, C] float32 in [−1, 1], sample rate)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos, fmt, body = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        chunk = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            fmt = chunk
        elif cid == b"data":
            body = chunk
        pos += 8 + size + (size & 1)
    if fmt is None or body is None or len(fmt) < 16:
        raise ValueError("WAV without fmt/data chunks")
    tag, channels, rate, _, block, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]
    if channels < 1 or rate < 1:
        raise ValueError("WAV with no channels or no sample rate")
    width = bits // 8
    n = len(body) // (width * channels)
    body = body[:n * width * channels]
    if tag == 1:
        if width == 1:
            x = (np.frombuffer(body, np.uint8).astype(np.float32) - 128.0) / 128.0
        elif width == 2:
            x = np.frombuffer(body, "<i2").astype(np.float32) / 32768.0
        elif width == 3:
            b = np.frombuffer(body, np.uint8).reshape(-1, 3).astype(np.int32)
            v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
            x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
        elif width == 4:
            x = np.frombuffer(body, "<i4").astype(np.float32) / float(1 << 31)
        else:
            raise ValueError(f"unsupported PCM width {bits} bits")
    elif tag == 3 and width in (4, 8):
        x = np.frombuffer(body, "<f4" if width == 4 else "<f8").astype(np.float32)
    else:
        raise ValueError(f"unsupported WAV encoding (format tag {tag}, {bits} bits)")
    return x.reshape(-1, channels), rate


def resample(x: np.ndarray, rate_in: int, rate_out: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """Band-limited (FFT) resampling of a mono signal."""
    if rate_in == rate_out or x.size == 0:
        return x.astype(np.float32)
    n_out = max(1, int(round(x.shape[0] * rate_out / rate_in)))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = n_out // 2 + 1
    out = np.zeros(keep, dtype=np.complex128)
    m = min(keep, spec.shape[0])
    out[:m] = spec[:m]
    y = np.fft.irfft(out, n=n_out) * (n_out / x.shape[0])
    return y.astype(np.float32)


MIN_AUDIO_RATE, MAX_AUDIO_RATE = 1000, 384_000      # Hz
MAX_AUDIO_SECONDS = 30                              # the model's limit per clip (mm_preprocess.MAX_AUDIO_SAMPLES)


def decode_audio(data: bytes, fmt: Optional[str] = None, part_index: Optional[int] = None) -> np.ndarray:
    """WAV (stdlib) or, with soundfile installed, mp3/flac/ogg → 16 kHz mono float32 [S]."""
    is_wav = data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    try:
        if is_wav:
            x, rate = _parse_wav(data)
        else:
            try:
                import soundfile
            except ImportError:
                what = fmt or "this"
                raise MediaError(f"cannot decode {what} audio: only WAV is supported by this server "
                                 f"(install the `soundfile` package for mp3/flac/ogg, or send 16 kHz WAV)",
                                 part_index) from None
            x, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot decode audio ({type(exc).__name__}: {exc})", part_index) from None
    rate = int(rate)
    if not MIN_AUDIO_RATE <= rate <= MAX_AUDIO_RATE:
        raise MediaError(f"audio sample rate {rate} Hz is outside {MIN_AUDIO_RATE}..{MAX_AUDIO_RATE} Hz", part_index)
    if len(x) > MAX_AUDIO_SECONDS * rate:     # before resampling: 20 kB at 1 Hz would become 3.2e8 samples
        raise MediaError(f"the audio clip lasts {len(x) / rate:.1f} s; this model takes at most "
                         f"{MAX_AUDIO_SECONDS} s per clip (split it into several clips)", part_index)
    mono = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    return resample(mono, rate)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ parts


async def load_image(url: str, policy: FetchPolicy = FetchPolicy(), part_index: Optional[int] = None,
                     max_soft_tokens: Optional[int] = None) -> LoadedMedia:
    data, _ = await get_bytes(url, policy, part_index)
    img = await asyncio.to_thread(decode_image, data, part_index)
    return LoadedMedia("image", img, _digest(data), part_index, max_soft_tokens)


async def load_audio(url: str, policy: FetchPolicy = FetchPolicy(), part_index: Optional[int] = None) -> LoadedMedia:
    data, ctype = await get_bytes(url, policy, part_index)
    wav = await asyncio.to_thread(decode_audio, data, ctype or None, part_index)
    return LoadedMedia("audio", wav, _digest(data), part_index)


async def load_input_audio(b64: str, fmt: Optional[str], policy: FetchPolicy = FetchPolicy(),
                           part_index: Optional[int] = None) -> LoadedMedia:
    """OpenAI `input_audio` {data: base64, format: wav|mp3}."""
    if fmt is not None and fmt not in ("wav", "mp3", "flac", "ogg"):
        raise MediaError(f"unsupported input_audio format {fmt!r} (use wav or mp3)", part_index)
    if len(b64) > policy.max_bytes * 4 // 3 + 8:
        raise MediaError(f"input_audio is over the {policy.max_bytes}-byte limit", part_index)
    data = b64decode(b64, part_index)
    wav = await asyncio.to_thread(decode_audio, data, fmt, part_index)
    return LoadedMedia("audio", wav, _digest(data), part_index)


async def load_part(part: dict, part_index: int, policy: FetchPolicy = FetchPolicy()) -> Optional[LoadedMedia]:
    """One OpenAI chat content part → LoadedMedia, or None for a non-media part (text, ...).

    image_url / input_image: {"image_url": {"url": ..., "max_soft_tokens"?: int}} (or a bare string);
    audio_url: {"audio_url": {"url": ...}}; input_audio: {"input_audio": {"data": b64, "format": "wav"|"mp3"}};
    video_url: {"video_url": {"url": ...}} (frames sampled by mm_video)."""
    kind = part.get("type")
    if kind in ("image_url", "input_image", "image"):
        spec = part.get("image_url", part.get("image"))
        url = spec.get("url") if isinstance(spec, dict) else spec
        budget = spec.get("max_soft_tokens") if isinstance(spec, dict) else None
        if not isinstance(url, str) or not url:
            raise MediaError("image part without a url", part_index)
        return await load_image(url, policy, part_index, budget)
    if kind in ("audio_url", "audio"):
        spec = part.get("audio_url", part.get("audio"))
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise MediaError("audio part without a url", part_index)
        return await load_audio(url, policy, part_index)
    if kind == "input_audio":
        spec = part.get("input_audio") or {}
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise MediaError("input_audio part without base64 data", part_index)
        return await load_input_audio(spec["data"], spec.get("format"), policy, part_index)
    if kind in ("video_url", "video"):
        from gemma4rt.frontend.mm_video import load_video
        spec = part.get("video_url", part.get("video"))
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise MediaError("video part without a url", part_index)
        return await load_video(url, policy, part_index)
    return None


__all__ = ["MediaError", "FetchPolicy", "LoadedMedia", "fetch_bytes", "parse_data_uri", "decode_image",
           "decode_audio", "resample", "load_image", "load_audio", "load_input_audio", "load_part"]
