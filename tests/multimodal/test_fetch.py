"""Media loading: URL fetching rules (private addresses, size, redirects, timeout), data URIs, decoding."""
import asyncio
import base64
import io
import struct

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from gemma4rt.frontend.mm_fetch import (FetchPolicy, MediaError, _make_resolver, decode_audio, decode_image,
                                        fetch_bytes, load_part)


def _png(w=20, h=10, color=(200, 10, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _gif():
    frames = [Image.new("P", (8, 6), i) for i in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _wav(x, rate, channels=1, width=2):
    """PCM WAV bytes of int16 (width 2) or float32 (width 4, IEEE) samples x [S, C]."""
    if width == 2:
        body = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
        tag = 1
    else:
        body = x.astype("<f4").tobytes()
        tag = 3
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * width, channels * width, 8 * width)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(body)) + b"WAVE" + b"fmt " +
            struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body)


def _serve(test):
    """Run `test(base_url)` against a local server on 127.0.0.1."""
    async def big(_):
        return web.Response(body=b"x" * 5000)

    async def stream_big(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"y" * 1000)
        await resp.write_eof()
        return resp

    async def redirect(request):
        n = int(request.match_info["n"])
        raise web.HTTPFound("/img.png" if n == 0 else f"/redirect/{n - 1}")

    async def slow(_):
        await asyncio.sleep(1.2)
        return web.Response(body=_png())

    async def main():
        app = web.Application()
        def fixed(body):
            async def handler(_):
                return web.Response(body=body)
            return handler

        app.router.add_get("/img.png", fixed(_png()))
        app.router.add_get("/anim.gif", fixed(_gif()))
        app.router.add_get("/bad.png", fixed(b"not an image at all"))
        app.router.add_get("/big", big)
        app.router.add_get("/stream-big", stream_big)
        app.router.add_get("/redirect/{n}", redirect)
        app.router.add_get("/slow", slow)
        app.router.add_get("/a.wav", fixed(_wav(np.zeros((800, 1)), 8000)))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            await test(f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()
    asyncio.run(main())


OPEN = FetchPolicy(allow_private=True, max_bytes=4000, timeout_s=5)


def test_local_server_refused_unless_private_allowed():
    async def test(base):
        with pytest.raises(MediaError, match="non-public"):
            await fetch_bytes(base + "/img.png", FetchPolicy(), part_index=2)
        m = await load_part({"type": "image_url", "image_url": {"url": base + "/img.png"}}, 3, OPEN)
        assert m.modality == "image" and m.data.size == (20, 10) and m.part_index == 3
        g = await load_part({"type": "image_url", "image_url": {"url": base + "/anim.gif"}}, 0, OPEN)
        assert g.data.mode == "RGB" and g.data.size == (8, 6)
        a = await load_part({"type": "audio_url", "audio_url": {"url": base + "/a.wav"}}, 0, OPEN)
        assert a.data.dtype == np.float32 and a.data.shape == (1600,)     # 8 kHz → 16 kHz
    _serve(test)


@pytest.mark.parametrize("url", ["http://127.0.0.1/x.png", "http://10.1.2.3/x.png", "http://169.254.169.254/latest",
                                 "https://[::1]/x", "http://localhost:8080/x", "http://192.168.0.7/a"])
def test_private_and_link_local_addresses_refused(url):
    with pytest.raises(MediaError) as e:
        asyncio.run(fetch_bytes(url, FetchPolicy(timeout_s=2), part_index=1))
    assert e.value.part_index == 1 and "refus" in str(e.value)


def test_resolver_refuses_names_that_resolve_to_private_addresses():
    async def go():
        r = _make_resolver(False)
        try:
            with pytest.raises(OSError, match="non-public"):
                await r.resolve("localhost", 80)
        finally:
            await r.close()
    asyncio.run(go())


def test_size_cap_redirect_cap_and_timeout():
    async def test(base):
        with pytest.raises(MediaError, match="limit"):
            await fetch_bytes(base + "/big", OPEN)                          # Content-Length over the cap
        with pytest.raises(MediaError, match="limit"):
            await fetch_bytes(base + "/stream-big", OPEN)                   # streamed past the cap
        body, _ = await fetch_bytes(base + "/redirect/2", OPEN)
        assert body == _png()
        with pytest.raises(MediaError, match="redirects"):
            await fetch_bytes(base + "/redirect/5", OPEN)
        with pytest.raises(MediaError, match="timed out"):
            await fetch_bytes(base + "/slow", FetchPolicy(allow_private=True, timeout_s=0.5))
        with pytest.raises(MediaError, match="cannot decode image") as e:
            await load_part({"type": "image_url", "image_url": {"url": base + "/bad.png"}}, 4, OPEN)
        assert e.value.part_index == 4
    _serve(test)


def test_data_uris_and_undecodable_media():
    png = _png(5, 7)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    m = asyncio.run(load_part({"type": "image_url", "image_url": {"url": uri}}, 0))
    assert m.data.size == (5, 7)
    with pytest.raises(MediaError, match="base64"):
        asyncio.run(load_part({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, 1))
    with pytest.raises(MediaError, match="cannot decode image"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage", part_index=2)
    with pytest.raises(MediaError, match="over the"):
        asyncio.run(load_part({"type": "image_url", "image_url": {"url": uri}}, 0, FetchPolicy(max_bytes=50)))
    assert asyncio.run(load_part({"type": "text", "text": "hi"}, 0)) is None
    with pytest.raises(MediaError, match="scheme"):
        asyncio.run(load_part({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, 0))


def test_input_audio_wav_resampled_and_downmixed():
    rate = 44100
    t = np.arange(rate // 2) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, left], axis=1)
    for width in (2, 4):
        b64 = base64.b64encode(_wav(stereo, rate, channels=2, width=width)).decode()
        m = asyncio.run(load_part({"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}, 0))
        x = m.data
        assert x.dtype == np.float32 and x.shape == (8000,)
        spec = np.abs(np.fft.rfft(x))
        assert abs(np.argmax(spec) * 16000 / len(x) - 440) < 3            # the tone survives resampling
        assert abs(np.abs(x[1000:7000]).max() - 0.5) < 0.02               # channels averaged, not summed


def test_audio_length_and_rate_checked_before_resampling():
    """A 20 kB WAV at 1 Hz would resample to 3.2e8 samples (fuzzing found the server at 9 GB): the rate
    and the clip's length are refused first."""
    with pytest.raises(MediaError, match="sample rate"):
        decode_audio(_wav(np.zeros((20000, 1)), 1), part_index=0)
    with pytest.raises(MediaError, match="lasts 31.0 s"):
        decode_audio(_wav(np.zeros((31 * 8000, 1)), 8000), part_index=0)
    assert decode_audio(_wav(np.zeros((29 * 8000, 1)), 8000)).shape == (29 * 16000,)


def test_mp3_without_a_decoder_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "soundfile", None)      # as on a machine without soundfile
    fake_mp3 = b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" * 100
    with pytest.raises(MediaError, match="WAV") as e:
        decode_audio(fake_mp3, "mp3", part_index=5)
    assert e.value.part_index == 5
    with pytest.raises(MediaError, match="format"):
        asyncio.run(load_part({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}, 0))


def test_decompression_bomb_refused(monkeypatch):
    from gemma4rt.frontend import mm_fetch
    monkeypatch.setattr(mm_fetch, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(MediaError, match="pixel limit"):
        decode_image(_png(20, 10))
    assert decode_image(_png(10, 10)).size == (10, 10)


@pytest.mark.parametrize("fmt", ["MP3", "FLAC", "OGG"])
def test_compressed_audio_decodes_to_16k_mono(fmt):
    """input_audio `format: mp3` (OpenAI) and flac/ogg clips decode through soundfile: a 22.05 kHz
    stereo 440 Hz tone becomes 16 kHz mono with its energy at 440 Hz."""
    import io

    import numpy as np
    import soundfile

    from gemma4rt.frontend.mm_fetch import decode_audio
    rate = 22050
    t = np.arange(rate) / rate
    tone = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, np.stack([tone, tone], axis=1), rate, format=fmt)
    x = decode_audio(buf.getvalue(), fmt.lower())
    assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 16000) < 1200
    spec = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spec) * 16000 / len(x) - 440) < 5
