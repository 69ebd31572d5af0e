"""Image and audio parts through `python -m gemma4rt.server` (the demo model: a tiny random Gemma 4
E-family with vision and audio towers) give transformers' greedy answer; bad media are 400s that
name the part, and the server goes on."""
import base64
import io
import json
import os
import sys
import wave

import numpy as np
import pytest
import torch

from .conftest import Server

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "multimodal"))
from _mm import hf_inputs, image, waveform  # noqa: E402

N = 12
BUDGET = 70


def png_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_bytes(x: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def srv():
    # with overlap scheduling, as a GPU server runs by default (the CPU default is synchronous)
    s = Server("--context-length", "4096", "--mm-processor-kwargs", json.dumps({"max_soft_tokens": BUDGET}),
               "--limit-mm-per-prompt", '{"image": 2, "audio": 1}', "--enable-overlap-schedule", timeout=300)
    yield s
    s.stop()


def _reference(messages, media):
    """transformers' greedy tokens for the same rendered prompt and preprocessed media."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma4rt.frontend.media import collect_parts
    from gemma4rt.frontend.mm_preprocess import MediaPreprocessor
    from gemma4rt.tools.tiny_checkpoint import demo_checkpoint_path

    path = str(demo_checkpoint_path())
    tok = AutoTokenizer.from_pretrained(path)
    msgs = json.loads(json.dumps(messages))
    collect_parts(msgs)
    ids = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(ids, add_special_tokens=False)
    exp = MediaPreprocessor.from_model_dir(path, BUDGET).expand_prompt(ids, media)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(**hf_inputs(exp), max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return tok.decode(out[0, len(exp.token_ids):].tolist(), skip_special_tokens=True), exp


def _ask(srv, messages):
    st, body, _ = srv.post("/v1/chat/completions", {"model": "default", "messages": messages, "max_tokens": N,
                                                    "min_tokens": N, "temperature": 0})   # as HF's min_new_tokens
    assert st == 200, body
    return json.loads(body)


def test_image_and_audio_give_transformers_greedy_answer(srv):
    from gemma4rt.frontend.mm_fetch import LoadedMedia, _digest, decode_audio, decode_image

    img_uri = png_uri(image(40, 56, 3))
    raw = base64.b64decode(img_uri.split(",", 1)[1])
    wav = wav_bytes(waveform(0.6, 5))
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": img_uri}}]}]
    want, exp = _reference(msgs, [LoadedMedia("image", decode_image(raw), _digest(raw), 0)])
    r = _ask(srv, msgs)
    assert r["usage"]["prompt_tokens"] == len(exp.token_ids)
    assert r["choices"][0]["message"]["content"] == want

    msgs = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "text", "text": "Transcribe."}]}]
    want, exp = _reference(msgs, [LoadedMedia("audio", decode_audio(wav, "wav"), _digest(wav), 0)])
    r = _ask(srv, msgs)
    assert r["usage"]["prompt_tokens"] == len(exp.token_ids)
    assert r["choices"][0]["message"]["content"] == want
    # the same clip as an audio_url data URI (the SGLang cookbook's form) gives the same answer, and a
    # repeat is served from the prefix cache (the media hash is part of the key)
    msgs[0]["content"][0] = {"type": "audio_url",
                             "audio_url": {"url": "data:audio/wav;base64," + base64.b64encode(wav).decode()}}
    again = _ask(srv, msgs)
    assert again["choices"][0]["message"]["content"] == want
    assert again["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) > 0


def test_openai_sdk_image_request(srv):
    from openai import OpenAI
    c = OpenAI(base_url=srv.url + "/v1", api_key="x", _strict_response_validation=True, max_retries=0)
    r = c.chat.completions.create(model="default", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_uri(image(20, 20, 1))}},
                                     {"type": "text", "text": "Describe."}]}])
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > BUDGET // 2


@pytest.mark.parametrize("part,needle", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}, "messages[0].content[1]"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}, "messages[0].content[1]"),
    ({"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}, "messages[0].content[1]"),
    ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "messages[0].content[1]"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "messages[0].content[1]"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "messages[0].content[1]"),
    ({"type": "image_url"}, "messages[0].content[1]"),
])
def test_bad_media_is_400_naming_the_part(srv, part, needle):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Look."}, part]}]
    st, body, _ = srv.post("/v1/chat/completions", {"model": "default", "messages": msgs, "max_tokens": 2})
    assert st == 400, body
    assert needle in json.loads(body)["error"]["message"], body
    assert srv.get("/health")[0] == 200


def test_limit_mm_per_prompt(srv):
    img = {"type": "image_url", "image_url": {"url": png_uri(image(16, 16, 2))}}
    msgs = [{"role": "user", "content": [img, img, img, {"type": "text", "text": "Three."}]}]
    st, body, _ = srv.post("/v1/chat/completions", {"model": "default", "messages": msgs, "max_tokens": 2})
    assert st == 400 and "--limit-mm-per-prompt" in json.loads(body)["error"]["message"]
    msgs[0]["content"] = [img, img, {"type": "text", "text": "Two."}]
    st, body, _ = srv.post("/v1/chat/completions", {"model": "default", "messages": msgs, "max_tokens": 2})
    assert st == 200, body


def test_dummy_real_geometry_with_the_demo_tokenizer():
    """`--load-format dummy` at a real geometry serves with the demo tokenizer, whose media token ids
    differ from the config's: placeholders are found by the tokenizer's ids."""
    from transformers import AutoTokenizer

    from gemma4rt.configs import lookup_builtin_config
    from gemma4rt.frontend.media import _adopt_tokenizer_ids, collect_parts
    from gemma4rt.frontend.mm_fetch import LoadedMedia
    from gemma4rt.frontend.mm_preprocess import MediaPreprocessor
    from gemma4rt.tools.tiny_checkpoint import demo_checkpoint_path

    tok = AutoTokenizer.from_pretrained(str(demo_checkpoint_path()))
    pre = MediaPreprocessor(lookup_builtin_config("gemma-4-E4B-it"), None, BUDGET)
    assert pre.ids["image_token_id"] != tok.convert_tokens_to_ids("<|image|>")
    _adopt_tokenizer_ids(pre, tok)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                         {"type": "text", "text": "Hi"}]}]
    collect_parts(msgs)
    ids = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    exp = pre.expand_prompt(ids, [LoadedMedia("image", image(720, 1280, 4), "d", 0)])
    (item,) = exp.mm_items
    assert 0 < item.num_tokens <= BUDGET and exp.token_ids[item.offset - 1] == tok.convert_tokens_to_ids("<|image>")


def test_elongated_image_is_a_400_and_others_are_unharmed(srv):
    """A 4000x20 image overflows the tiny ViT's position table: a 400 naming the part, while a
    concurrent request completes."""
    import concurrent.futures as cf
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_uri(image(20, 4000, 1))}},
                                        {"type": "text", "text": "?"}]}]
    with cf.ThreadPoolExecutor(2) as ex:
        f_bad = ex.submit(srv.post, "/v1/chat/completions", {"model": "default", "messages": bad, "max_tokens": 2})
        f_ok = ex.submit(_ask, srv, [{"role": "user", "content": "Hello"}])
        st, body, _ = f_bad.result()
        assert st == 400 and "messages[0].content[0]" in json.loads(body)["error"]["message"], body
        assert f_ok.result()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("overlap", [False, True])
def test_worker_media_failure_fails_only_its_request(overlap):
    """If encoding one request's media raises in the worker, that request ends with an error and the
    others in the same step still get their tokens (with overlap scheduling, the next plan, made before
    the error came back, still schedules the failed request: the worker leaves it out)."""
    from gemma4rt.config import EngineConfig, SchedulerConfig
    from gemma4rt.engine import Engine
    from gemma4rt.frontend.mm_fetch import LoadedMedia
    from gemma4rt.frontend.mm_preprocess import MediaPreprocessor
    from gemma4rt.protocol import AddRequest, SamplingParams
    from gemma4rt.tools.tiny_checkpoint import demo_checkpoint_path

    path = str(demo_checkpoint_path())
    eng = Engine(EngineConfig(model_path=path, device="cpu", dtype="float32",
                              scheduler=SchedulerConfig(overlap_schedule=overlap)))
    assert eng.overlap == overlap
    pre = MediaPreprocessor.from_model_dir(path, BUDGET)
    exp = pre.expand_prompt([2, 10, pre.ids["image_token_id"], 11], [LoadedMedia("image", image(30, 30, 2), "d", 0)])
    item = exp.mm_items[0]
    item.arrays["pixel_values"] = ("float32", [1, 3], b"\0" * 12)          # corrupt: wrong patch width
    sp = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    eng.add_request(AddRequest(rid="bad", prompt_token_ids=exp.token_ids, sampling=sp, mm_items=[item]))
    eng.add_request(AddRequest(rid="good", prompt_token_ids=[2, 10, 11, 12], sampling=sp))
    fins = {}
    for _ in range(20):
        for o in eng.step().outputs:
            if o.finish_reason:
                fins[o.rid] = o
        if len(fins) == 2:
            break
    assert fins["bad"].finish_reason == "error" and "encode" in fins["bad"].error
    assert fins["good"].finish_reason == "length"


def test_video_gives_transformers_greedy_answer(srv):
    """A `video_url` mp4 data URI: frames sampled, the prompt in Gemma 4's video form, and the answer
    transformers gives on the same frames (`pixel_values_videos`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma4rt.frontend.media import collect_parts
    from gemma4rt.frontend.mm_fetch import LoadedMedia, _digest
    from gemma4rt.frontend.mm_preprocess import MediaPreprocessor
    from gemma4rt.frontend.mm_video import decode_video
    from gemma4rt.tools.tiny_checkpoint import demo_checkpoint_path
    from _mm import hf_video_inputs
    from test_video import mp4

    data = mp4(40, fps=8)
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {
        "url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}, {"type": "text", "text": "What?"}]}]
    st, body, _ = srv.post("/v1/chat/completions", {"model": "default", "messages": msgs, "max_tokens": N,
                                                    "min_tokens": N, "temperature": 0})   # as HF's min_new_tokens
    assert st == 200, body
    r = json.loads(body)

    path = str(demo_checkpoint_path())
    tok = AutoTokenizer.from_pretrained(path)
    pre = MediaPreprocessor.from_model_dir(path, BUDGET)
    items, repl = pre.video_items(LoadedMedia("video", decode_video(data), _digest(data), 0, 70))
    m = json.loads(json.dumps(msgs))
    collect_parts(m)
    text = tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True).replace("<|video|>", repl, 1)
    ids = tok.encode(text, add_special_tokens=False)
    pre.place_video_items(ids, items)
    assert r["usage"]["prompt_tokens"] == len(ids) and len(items) == 32
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(**hf_video_inputs(ids, items), max_new_tokens=N, min_new_tokens=N, do_sample=False)
    assert r["choices"][0]["message"]["content"] == tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def _image_through(server_args, img, prompt):
    """An image request through a server started with server_args gives transformers' greedy answer."""
    from gemma4rt.frontend.mm_fetch import LoadedMedia, _digest, decode_image

    img_uri = png_uri(img)
    raw = base64.b64decode(img_uri.split(",", 1)[1])
    msgs = [{"role": "user", "content": [{"type": "text", "text": prompt},
                                         {"type": "image_url", "image_url": {"url": img_uri}}]}]
    want, exp = _reference(msgs, [LoadedMedia("image", decode_image(raw), _digest(raw), 0)])
    s = Server(*server_args, "--context-length", "4096", "--mm-processor-kwargs",
               json.dumps({"max_soft_tokens": BUDGET}), timeout=300)
    try:
        r = _ask(s, msgs)
        assert r["usage"]["prompt_tokens"] == len(exp.token_ids)
        assert r["choices"][0]["message"]["content"] == want
    finally:
        s.stop()


def test_image_request_through_two_tensor_parallel_ranks():
    """--tp 2 on the CPU: the step plan that carries the image's preprocessed arrays reaches the second
    rank, both ranks encode it, and the sharded model gives transformers' greedy answer."""
    _image_through(["--tp", "2", "--device", "cpu"], image(40, 56, 3), "What is this?")


def test_image_request_with_overlap_scheduling():
    """--enable-overlap-schedule: an image prompt (prefilled in chunks) and its decode steps, whose inputs
    come from the device, give transformers' greedy answer."""
    _image_through(["--enable-overlap-schedule", "--chunked-prefill-size", "48"], image(48, 40, 5), "Describe it.")
