"""Helpers for the multimodal tests: our runner fed MultimodalItems, and the same inputs for transformers."""
import numpy as np
import torch

from gemma4rt.config import EngineConfig
from gemma4rt.frontend.mm_fetch import LoadedMedia
from gemma4rt.frontend.mm_preprocess import MediaPreprocessor
from gemma4rt.protocol import NewRequestData, SamplingParams, ScheduledRequest, StepPlan
from gemma4rt.worker.mm_inputs import decode_array
from gemma4rt.worker.model_runner import ModelRunner

_CACHE = {}


def runner_for(path):
    if path not in _CACHE:
        _CACHE[path] = ModelRunner(EngineConfig(model_path=path, device="cpu", dtype="float32"))
    return _CACHE[path]


def hf_for(path):
    key = ("hf", path)
    if key not in _CACHE:
        from transformers import AutoModelForCausalLM
        _CACHE[key] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _CACHE[key]


def image(h, w, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


def waveform(seconds, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000.0
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def media(kind, data, tag, budget=None):
    return LoadedMedia(kind, data, f"digest-{tag}", 0, budget)


def expand(path, text_before, ms, text_after=(12, 13, 14, 15), budget=70):
    """ids [bos, text_before..., one placeholder per media, text_after...] expanded by our preprocessor."""
    pre = MediaPreprocessor.from_model_dir(path, default_image_tokens=budget)
    ids = [2] + list(text_before)
    for m in ms:
        ids.append(pre.ids["image_token_id"] if m.modality == "image" else pre.ids["audio_token_id"])
    ids += list(text_after)
    return pre.expand_prompt(ids, ms)


def hf_inputs(exp, pad_images_to=None):
    """The same inputs for transformers: padded pixel batch, audio batch, mm_token_type_ids."""
    ids = torch.tensor([exp.token_ids])
    out = {"input_ids": ids}
    imgs = [it for it in exp.mm_items if it.modality == "image"]
    auds = [it for it in exp.mm_items if it.modality == "audio"]
    if imgs:
        pix = [torch.from_numpy(decode_array(it.arrays["pixel_values"])) for it in imgs]
        pos = [torch.from_numpy(decode_array(it.arrays["image_position_ids"])).long() for it in imgs]
        n = pad_images_to or max(p.shape[0] for p in pix)
        out["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros(n - p.shape[0], p.shape[1])]) for p in pix])
        out["image_position_ids"] = torch.stack([torch.cat([q, q.new_full((n - q.shape[0], 2), -1)]) for q in pos])
    if auds:
        f = [torch.from_numpy(decode_array(it.arrays["input_features"])) for it in auds]
        m = [torch.from_numpy(decode_array(it.arrays["input_features_mask"])) for it in auds]
        n = max(x.shape[0] for x in f)
        out["input_features"] = torch.stack([torch.cat([x, x.new_zeros(n - x.shape[0], x.shape[1])]) for x in f])
        out["input_features_mask"] = torch.stack([torch.cat([x, x.new_zeros(n - x.shape[0])]) for x in m])
    tt = torch.zeros_like(ids)
    for it in exp.mm_items:
        tt[0, it.offset:it.offset + it.num_tokens] = 1 if it.modality == "image" else 3
    out["mm_token_type_ids"] = tt
    return out


def _pages(runner, n):
    return {s.name: list(range((n + s.page_size - 1) // s.page_size)) for s in runner.pool_specs}


def prefill_logits(runner, exp, chunks=None):
    """Logits of every prompt position through our runner (ModelRunner._build_context → attach_mm_inputs),
    optionally in chunks (a list of chunk lengths), with the KV cache carried between chunks."""
    ids = exp.token_ids
    n = len(ids)
    runner._add(NewRequestData(rid="p", token_ids=list(ids), num_prompt_tokens=n, sampling=SamplingParams(),
                               pages=_pages(runner, n), mm_items=list(exp.mm_items)))
    outs, start = [], 0
    try:
        for c in (chunks or [n]):
            sr = ScheduledRequest(rid="p", start=start, num_tokens=c, new_pages={}, sample=False)
            ctx, _ = runner._build_context([sr])
            ctx.logits_indices = torch.arange(c)
            with torch.inference_mode():
                outs.append(runner.model.compute_logits(runner.model(ctx)))
            start += c
    finally:
        runner.seqs.pop("p", None)
    return torch.cat(outs)


def greedy(runner, exp, n_steps):
    ids = exp.token_ids
    params = SamplingParams(temperature=0.0, max_new_tokens=n_steps, min_new_tokens=n_steps)
    nr = NewRequestData(rid="g", token_ids=list(ids), num_prompt_tokens=len(ids), sampling=params,
                        pages=_pages(runner, len(ids) + n_steps), mm_items=list(exp.mm_items))
    out = []
    res = runner.execute(StepPlan(step_id=0, new_requests=[nr], removed_rids=[],
                                  scheduled=[ScheduledRequest(rid="g", start=0, num_tokens=len(ids), new_pages={},
                                                              sample=True)]))
    out += res.sampled[0].token_ids
    for s in range(1, n_steps):
        res = runner.execute(StepPlan(step_id=s, new_requests=[], removed_rids=[], scheduled=[
            ScheduledRequest(rid="g", start=len(ids) + s - 1, num_tokens=1, new_pages={}, sample=True)]))
        out += res.sampled[0].token_ids
    runner.execute(StepPlan(step_id=n_steps, new_requests=[], scheduled=[], removed_rids=["g"]))
    return out


def hf_video_inputs(ids, frames):
    """transformers' video inputs for one video whose frame items sit in `ids`: padded
    pixel_values_videos / video_position_ids, num_frames_per_video, mm_token_type_ids (2 = video)."""
    pix = [torch.from_numpy(decode_array(it.arrays["pixel_values"])) for it in frames]
    pos = [torch.from_numpy(decode_array(it.arrays["image_position_ids"])).long() for it in frames]
    n = max(p.shape[0] for p in pix)
    tt = torch.zeros(1, len(ids), dtype=torch.long)
    for it in frames:
        tt[0, it.offset:it.offset + it.num_tokens] = 2
    return {"input_ids": torch.tensor([ids]), "mm_token_type_ids": tt,
            "num_frames_per_video": torch.tensor([len(frames)]),
            "pixel_values_videos": torch.stack([torch.cat([p, p.new_zeros(n - p.shape[0], p.shape[1])]) for p in pix]),
            "video_position_ids": torch.stack([torch.cat([q, q.new_full((n - q.shape[0], 2), -1)]) for q in pos])}
