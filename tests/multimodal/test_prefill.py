"""Image/audio + text prefill logits and greedy decoding of our ModelRunner against transformers (fp32).

Tolerance: the tiny random models amplify soft-token perturbations strongly (HF's own logits move by 1.7e-3
when its image features get 1e-6 of noise — soft tokens are not scaled by sqrt(d), so they are small next to
the text rows), while our towers agree with HF's to ~3e-7 (test_towers.py); measured full-prompt errors are
2e-5–5e-5. Full-prompt logits are held to 2e-4; every wrong-mask variant moves them by more than 1e-2."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _mm import expand, greedy, hf_for, hf_inputs, image, media, prefill_logits, runner_for, waveform  # noqa: E402

from gemma4rt.model import text as text_module  # noqa: E402

TOL = 2e-4


def _hf_logits(hf, inp, unified=False):
    with torch.no_grad():
        kw = dict(inp)
        if unified:
            # the generate-path masks (gemma4-architecture.md §6.5): full layers causal, sliding + blocks
            kw["attention_mask"] = _mask_dict(hf, kw)
        return hf(**kw, use_cache=False).logits[0].float()


def test_e_image_audio_text_prefill(tiny_checkpoint):
    """E2B/E4B style: clipped ViT + conformer + PLE; causal everywhere."""
    path = tiny_checkpoint("e")
    exp = expand(path, [10, 11], [media("image", image(37, 53, 0), "i0"), media("audio", waveform(0.3, 1), "a0")],
                 text_after=[12, 13, 14])
    assert [it.modality for it in exp.mm_items] == ["image", "audio"]
    ours = prefill_logits(runner_for(path), exp)
    ref = _hf_logits(hf_for(path), hf_inputs(exp))
    err = (ours - ref).abs().max().item()
    print(f"[mm parity] e image+audio prefill ({len(exp.token_ids)} tokens): max |Δlogit| = {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_two_images_bidirectional_prefill(family, tiny_checkpoint):
    """31B/26B style: two images in one prompt; blocks bidirectional on sliding layers only."""
    path = tiny_checkpoint(family)
    exp = expand(path, [10, 11], [media("image", image(40, 24, 2), "i1"), media("image", image(17, 30, 3), "i2")])
    assert exp.mm_items[0].bidirectional and exp.mm_items[0].num_tokens > 4      # blocks longer than W = 4
    runner = runner_for(path)
    ours = prefill_logits(runner, exp)
    ref = _hf_logits(hf_for(path), hf_inputs(exp))
    err = (ours - ref).abs().max().item()
    print(f"[mm parity] {family} two-image prefill: max |Δlogit| = {err:.2e}")
    assert err < TOL


def test_bidirectional_mask_negative_controls(tiny_checkpoint, monkeypatch):
    """The exact mask matters: bidirectionality on full layers, or one block across both images, or none
    at all, each moves the logits away from transformers."""
    path = tiny_checkpoint("dense")
    exp = expand(path, [10, 11], [media("image", image(40, 24, 2), "i1"), media("image", image(17, 30, 3), "i2")])
    runner = runner_for(path)
    ref = _hf_logits(hf_for(path), hf_inputs(exp))
    real = text_module.ops.paged_attention

    def variant(mode):
        def attn(q, kc, vc, pt, cu, lens, window, block_ids, scale, **kw):
            ids = variant.block
            if mode == "full_too":
                block_ids = ids
            elif mode == "one_block" and block_ids is not None:
                block_ids = torch.where(block_ids >= 0, 0, -1).to(block_ids.dtype)
            elif mode == "none":
                block_ids = None
            return real(q, kc, vc, pt, cu, lens, window, block_ids, scale, **kw)
        return attn

    from gemma4rt.worker import mm_inputs
    orig_attach = mm_inputs.attach_mm_inputs

    def spy(model, ctx, items, cache):
        orig_attach(model, ctx, items, cache)
        variant.block = ctx.block_ids
    monkeypatch.setattr(mm_inputs, "attach_mm_inputs", spy)
    errs = {}
    for mode in ("full_too", "one_block", "none"):
        monkeypatch.setattr(text_module.ops, "paged_attention", variant(mode))
        errs[mode] = (prefill_logits(runner, exp) - ref).abs().max().item()
    monkeypatch.setattr(text_module.ops, "paged_attention", real)
    print(f"[mm parity] wrong-mask errors: {errs}")
    assert all(e > 1e-2 for e in errs.values())


def test_unified_image_audio_prefill(tiny_checkpoint):
    """12B style: encoder-free patch embedder and raw-audio projection, generate-path masks."""
    path = tiny_checkpoint("unified")
    exp = expand(path, [10], [media("image", image(30, 21, 4), "u1"), media("audio", waveform(0.01, 5), "ua")])
    ours = prefill_logits(runner_for(path), exp)
    ref = _hf_logits(hf_for(path), hf_inputs(exp), unified=True)
    err = (ours - ref).abs().max().item()
    print(f"[mm parity] unified image+audio prefill: max |Δlogit| = {err:.2e}")
    assert err < TOL


def test_chunked_prefill_encodes_once(tiny_checkpoint, monkeypatch):
    """An audio span split over three chunks: the same logits as one chunk, and one encoder call."""
    from gemma4rt.worker import mm_inputs
    path = tiny_checkpoint("e")
    exp = expand(path, [10, 11], [media("audio", waveform(0.4, 6), "chunk-a")])
    runner = runner_for(path)
    calls = []
    orig = mm_inputs.encode_item
    monkeypatch.setattr(mm_inputs, "encode_item", lambda *a: calls.append(1) or orig(*a))
    runner.mm_cache.clear()
    one = prefill_logits(runner, exp)
    assert len(calls) == 1
    a = exp.mm_items[0].offset
    n = len(exp.token_ids)
    chunked = prefill_logits(runner, exp, chunks=[a + 3, 5, n - a - 8])
    assert len(calls) == 1                      # cached by content hash
    # fp32 on the CPU: one chunk and three chunks run GEMMs of different shapes, so summation order (and
    # rounding) differs by CPU and BLAS build (2.1e-5 on an AMD EPYC, < 1e-5 on a Xeon); a misplaced audio
    # soft token or a second encode of different features moves logits by > 1e-2
    assert (one - chunked).abs().max().item() < 1e-4
    runner.mm_cache.clear()
    prefill_logits(runner, exp, chunks=[a + 3, 5, n - a - 8])
    assert len(calls) == 2                      # cold cache: still one encode for three chunks


def _hf_greedy_generate_masks(hf, inp, n):
    """HF greedy with the §4.6 / §6.5 generate-path masks at prefill, then plain cached decode steps.
    (transformers 5.23's own `generate()` on the unified model builds the forward-path variant instead:
    bidirectional blocks on full layers too and not window-limited — measured O(1) logit difference.)"""
    logits = []
    with torch.no_grad():
        out = hf(**inp, attention_mask=_mask_dict(hf, inp), use_cache=True)
        for i in range(n):
            logits.append(out.logits[:, -1].float())
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            if i + 1 < n:
                out = hf(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
            inp = {"input_ids": torch.cat([inp["input_ids"], tok], 1)}
    return inp["input_ids"], logits


def _mask_dict(hf, inp):
    emb = hf.get_input_embeddings()(inp["input_ids"])
    return hf.create_masks_for_generate(hf.config, emb, None, None, torch.arange(emb.shape[1])[None],
                                        mm_token_type_ids=inp["mm_token_type_ids"])


@pytest.mark.parametrize("family", ["e", "dense", "unified"])
def test_greedy_after_image_matches_generate(family, tiny_checkpoint, monkeypatch):
    """16 greedy tokens after an image equal HF's, and so do the logits of every decode step
    (the tiny models tend to repeat a token, so the per-step logits carry the real check)."""
    path = tiny_checkpoint(family)
    exp = expand(path, [10, 11], [media("image", image(33, 45, 7), f"g-{family}")], text_after=[60, 61, 62, 63])
    runner = runner_for(path)
    seen = []
    orig = runner.model.compute_logits
    monkeypatch.setattr(runner.model, "compute_logits", lambda h: seen.append(orig(h)) or seen[-1])
    ours = greedy(runner, exp, 16)
    monkeypatch.undo()
    hf = hf_for(path)
    if family == "unified":
        seq, ref_logits = _hf_greedy_generate_masks(hf, hf_inputs(exp), 16)
    else:
        with torch.no_grad():
            out = hf.generate(**hf_inputs(exp), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)
        seq, ref_logits = out.sequences, out.logits
    ref = seq[0, len(exp.token_ids):].tolist()
    err = max((a[-1] - b[0].float()).abs().max().item() for a, b in zip(seen, ref_logits))
    print(f"[mm parity] {family} greedy after an image: {ours}; max |Δlogit| over 16 steps = {err:.2e}")
    assert ours == ref
    assert len(seen) == len(ref_logits) == 16 and err < TOL


def test_two_requests_in_one_step(tiny_checkpoint):
    """Rows and block ids of two image requests batched in one step land where they belong."""
    from gemma4rt.protocol import NewRequestData, SamplingParams, ScheduledRequest
    path = tiny_checkpoint("dense")
    runner = runner_for(path)
    exps = [expand(path, [10, 11], [media("image", image(40, 24, 2), "b1")]),
            expand(path, [20, 21, 22], [media("image", image(17, 30, 3), "b2")], text_after=[30, 31])]
    single = [prefill_logits(runner, e) for e in exps]
    nxt = {s.name: 0 for s in runner.pool_specs}
    scheduled = []
    for i, e in enumerate(exps):
        n = len(e.token_ids)
        pages = {}
        for s in runner.pool_specs:
            k = (n + s.page_size - 1) // s.page_size
            pages[s.name], nxt[s.name] = list(range(nxt[s.name], nxt[s.name] + k)), nxt[s.name] + k
        runner._add(NewRequestData(rid=f"b{i}", token_ids=list(e.token_ids), num_prompt_tokens=n,
                                   sampling=SamplingParams(), pages=pages, mm_items=list(e.mm_items)))
        scheduled.append(ScheduledRequest(rid=f"b{i}", start=0, num_tokens=n, new_pages={}, sample=False))
    try:
        ctx, _ = runner._build_context(scheduled)
        total = ctx.num_tokens
        ctx.logits_indices = torch.arange(total)
        with torch.inference_mode():
            both = runner.model.compute_logits(runner.model(ctx))
    finally:
        runner.seqs.clear()
    n0 = len(exps[0].token_ids)
    assert sorted(ctx.block_ids.unique().tolist()) == [-1, 0, 1]
    assert ctx.soft_rows.tolist() == (list(range(exps[0].mm_items[0].offset, exps[0].mm_items[0].offset + exps[0].mm_items[0].num_tokens))
                                      + list(range(n0 + exps[1].mm_items[0].offset,
                                                   n0 + exps[1].mm_items[0].offset + exps[1].mm_items[0].num_tokens)))
    assert (both[:n0] - single[0]).abs().max().item() < 1e-5
    assert (both[n0:] - single[1]).abs().max().item() < 1e-5
