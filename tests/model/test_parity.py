"""Our model, loaded through our loader from save_pretrained output, against transformers (fp32)."""
import sys
import os

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _driver import greedy_generate  # noqa: E402

from gemma4rt.config import EngineConfig  # noqa: E402
from gemma4rt.worker.model_runner import ModelRunner  # noqa: E402

FAMILIES = ["e", "dense", "moe", "unified"]


def _hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _runner(path, **kw):
    return ModelRunner(EngineConfig(model_path=path, device="cpu", dtype="float32", **kw))


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(5, 400, (n - 1,), generator=g).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    runner, hf = _runner(path), _hf(path)
    ids = _prompt(23, 1)
    ours = runner.score(ids)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    err = (ours - ref).abs().max().item()
    print(f"[parity] {family}: prefill max |Δlogit| = {err:.2e} (logit scale {ref.abs().max().item():.2f})")
    assert err < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decode_matches_transformers_generate(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    runner, hf = _runner(path), _hf(path)
    prompts = [_prompt(n, 10 + n) for n in (11, 6, 17)]        # all longer than the window (4)
    ours = greedy_generate(runner, prompts, 32)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                            attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert o == g[0, len(p):].tolist()


@pytest.mark.parametrize("family", ["e", "moe"])
def test_batched_equals_one_at_a_time(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    runner = _runner(path)
    prompts = [_prompt(n, 100 + n) for n in (3, 9, 14, 5)]
    together = greedy_generate(runner, prompts, 12)
    alone = [greedy_generate(runner, [p], 12)[0] for p in prompts]
    assert together == alone


def test_soft_tokens_replace_placeholder_rows(tiny_checkpoint):
    """Precomputed soft-token embeddings at placeholder rows equal HF's inputs_embeds path."""
    from gemma4rt.protocol import NewRequestData, SamplingParams, ScheduledRequest
    path = tiny_checkpoint("dense")
    runner, hf = _runner(path), _hf(path)
    ids = [2, 10, 11, 500] + [502] * 4 + [501, 12, 13]
    rows = torch.tensor([4, 5, 6, 7])
    soft = torch.randn(4, runner.config.text.hidden_size)
    lm = runner.model.language_model
    with torch.no_grad():
        emb = hf.get_input_embeddings()(torch.tensor([[0 if t == 502 else t for t in ids]]))
        emb[0, rows] = soft
        ref = hf(inputs_embeds=emb, use_cache=False).logits[0].float()
    pages = {s.name: list(range(4)) for s in runner.pool_specs}
    runner._add(NewRequestData(rid="x", token_ids=ids, num_prompt_tokens=len(ids), sampling=SamplingParams(),
                               pages=pages))
    ctx, _ = runner._build_context([ScheduledRequest(rid="x", start=0, num_tokens=len(ids), new_pages={}, sample=False)])
    runner.seqs.clear()
    ctx.logits_indices = torch.arange(len(ids))
    ctx.soft_rows, ctx.soft_embeds = rows, soft
    ours = lm.logits(lm(ctx))
    assert (ours - ref).abs().max().item() < 1e-4
