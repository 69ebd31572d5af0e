"""Speculative decoding with the Gemma 4 assistant (MTP) drafter (--speculative-algorithm NEXTN): the
drafter's step equals transformers' Gemma4AssistantForCausalLM on the target's K/V, and greedy verification
gives exactly the tokens of plain decoding (greedy or seeded sampling, with logprobs) whether the drafts are
random (all rejected), right (all accepted) or right up to a point."""
import pytest
import torch

from gemma4rt import LLM
from gemma4rt.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from gemma4rt.protocol import SamplingParams
from gemma4rt.spec import drafter as drafter_mod
from gemma4rt.tools.tiny_checkpoint import load_tiny_model

PROMPTS = [[2] + [(7 * i + 3 * j) % 90 + 5 for j in range(n)] for i, n in enumerate([5, 70, 12, 33, 3])]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from gemma4rt.tools.tiny_checkpoint import write_tiny_checkpoint
    t = str(write_tiny_checkpoint(tmp_path_factory.mktemp("spec-target"), "e", seed=0, dtype=torch.float32))
    d = str(write_tiny_checkpoint(tmp_path_factory.mktemp("spec-drafter"), "assistant", seed=1, dtype=torch.float32))
    return t, d


def _llm(ckpts, spec: bool, steps: int = 3):
    t, d = ckpts
    cfg = EngineConfig(model_path=t, device="cpu", seed=0,
                       scheduler=SchedulerConfig(max_running_requests=4, chunked_prefill_size=40),
                       speculative=SpeculativeConfig(algorithm="NEXTN", draft_model_path=d, num_steps=steps)
                       if spec else SpeculativeConfig())
    return LLM(engine_config=cfg)


def test_drafter_step_equals_transformers(ckpts, monkeypatch):
    """The first drafting step after a 4-token prompt (within the tiny sliding window, where transformers'
    W+1-key drafter window and ours see the same keys): logits and the recurrent state."""
    seen = []
    orig = drafter_mod.Drafter.step
    monkeypatch.setattr(drafter_mod.Drafter, "step",
                        lambda self, ctx, emb, g: (lambda r: (seen.append((ctx.positions.clone(), emb.clone(),
                                                                           g.clone(), r)), r)[1])(orig(self, ctx, emb, g)))
    prompt = [2, 11, 12, 13]
    out = _llm(ckpts, True).generate([prompt], SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True))[0]
    pos, emb, g, (logits, g2) = seen[0]
    assert pos.tolist() == [4]
    T, A = load_tiny_model(ckpts[0], "e"), load_tiny_model(ckpts[1])
    with torch.no_grad():
        o = T(input_ids=torch.tensor([prompt]), output_hidden_states=True, return_shared_kv_states=True)
        x = torch.tensor([[out.token_ids[0]]])
        e = T.get_input_embeddings()(x)
        h = o.hidden_states[-1][:, -1:]
        torch.testing.assert_close(e[0], emb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h[0], g, atol=1e-4, rtol=1e-4)
        ref = A(inputs_embeds=torch.cat([e, h], dim=-1), attention_mask=torch.ones(1, 5, dtype=torch.long),
                position_ids=torch.tensor([[4]]), shared_kv_states=o.shared_kv_states, use_cache=False)
    torch.testing.assert_close(logits, ref.logits[0].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g2, ref.last_hidden_state[0], atol=1e-4, rtol=1e-4)
    assert logits.argmax(-1).item() == ref.logits[0, -1].argmax().item()


def _oracle(monkeypatch, refs, corrupt_after=None):
    """Drafts read from the plain greedy continuations (by position and newest token); corrupt_after=k
    makes every draft after the k-th wrong."""
    def draft(self, ctx, tokens, hidden, target_embed, embed_scale, num_steps, vocab_limit=None):
        rows = []
        for p, x in zip(ctx.positions.tolist(), tokens.tolist()):
            seq = next((s for s in refs if len(s) > p and s[p] == x), None)
            d = list(seq[p + 1:p + 1 + num_steps]) if seq is not None else []
            d += [5] * (num_steps - len(d))
            if corrupt_after is not None:
                d = d[:corrupt_after] + [(t + 1) % 400 + 5 for t in d[corrupt_after:]]
            rows.append(d)
        return torch.tensor(rows)
    monkeypatch.setattr(drafter_mod.Drafter, "draft", draft)


def _mixed_params():
    """Greedy, seeded sampling with top-k / top-p / min-p, logprobs with top logprobs, min_new_tokens."""
    return [SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True),
            SamplingParams(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9, seed=7, ignore_eos=True),
            SamplingParams(max_new_tokens=15, temperature=0.0, logprobs=True, top_logprobs=2, ignore_eos=True),
            SamplingParams(max_new_tokens=18, temperature=0.7, min_p=0.05, seed=3, min_new_tokens=6),
            SamplingParams(max_new_tokens=25, temperature=1.0, seed=11, logprobs=True, ignore_eos=True)]


@pytest.mark.parametrize("drafts", ["model", "right", "right_then_wrong"])
def test_speculative_equals_plain_decoding(ckpts, monkeypatch, drafts):
    """Greedy and seeded sampled requests alike: verification makes each row's plain choice (the seeded
    noise of that output position), so the tokens and logprobs are exactly plain decoding's."""
    sp = _mixed_params()
    plain = _llm(ckpts, False).generate(PROMPTS, sp)
    if drafts != "model":
        _oracle(monkeypatch, [p + o.token_ids for p, o in zip(PROMPTS, plain)],
                corrupt_after=1 if drafts == "right_then_wrong" else None)
    llm = _llm(ckpts, True)
    spec = llm.generate(PROMPTS, sp)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        if a.logprobs is not None:
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-5)
        if a.top_logprobs is not None:
            assert [[t for t, _ in x] for x in a.top_logprobs] == [[t for t, _ in x] for x in b.top_logprobs]
    r = llm.engine.runner
    assert r.spec_verify_rows > 10 and r.spec_drafted > 0
    if drafts == "right":
        assert r.spec_accepted > 0.8 * r.spec_drafted, (r.spec_accepted, r.spec_drafted)
        assert llm.engine.num_steps < _steps(ckpts, sp)
    elif drafts == "right_then_wrong":
        assert 0 < r.spec_accepted <= r.spec_verify_rows


def _steps(ckpts, sp):
    llm = _llm(ckpts, False)
    llm.generate(PROMPTS, sp)
    return llm.engine.num_steps


def test_penalties_decode_plainly(ckpts):
    """Requests with repetition penalties get no drafts (the same tokens as without a drafter)."""
    sp = [SamplingParams(max_new_tokens=10, temperature=0.8, seed=3, repetition_penalty=1.2, ignore_eos=True),
          SamplingParams(max_new_tokens=10, temperature=0.0, frequency_penalty=0.5, ignore_eos=True)]
    plain = _llm(ckpts, False).generate(PROMPTS[:2], sp)
    llm = _llm(ckpts, True)
    spec = llm.generate(PROMPTS[:2], sp)
    assert [o.token_ids for o in plain] == [o.token_ids for o in spec]
    assert llm.engine.runner.spec_verify_rows == 0


def test_cli_flags():
    from gemma4rt.cli import parse_args
    eng, _, _ = parse_args(["--speculative-algorithm", "NEXTN", "--speculative-draft-model-path", "x",
                            "--speculative-num-steps", "4", "--speculative-num-draft-tokens", "5"])
    assert eng.speculative.num_steps == 4 and eng.speculative.draft_model_path == "x"
    for bad in (["--speculative-algorithm", "NEXTN"],
                ["--speculative-algorithm", "NGRAM", "--speculative-draft-model-path", "x"],
                ["--speculative-algorithm", "NEXTN", "--speculative-draft-model-path", "x", "--speculative-eagle-topk", "4"],
                ["--speculative-algorithm", "NEXTN", "--speculative-draft-model-path", "x", "--speculative-num-steps", "3",
                 "--speculative-num-draft-tokens", "8"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_speculative_with_preemption_and_stops(ckpts, monkeypatch):
    """A KV pool too small for the batch (preemption and recompute mid-generation, drafts dropped) and
    stop tokens inside accepted drafts: still plain decoding's tokens and finish reasons."""
    t, d = ckpts
    sp = [SamplingParams(max_new_tokens=40, temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True)
          for i in range(4)]

    def run(spec, stop=None, **kw):
        cfg = EngineConfig(model_path=t, device="cpu", seed=0,
                           cache=CacheConfig(max_total_tokens=kw.get("tokens", 1 << 14)),
                           scheduler=SchedulerConfig(max_running_requests=4, chunked_prefill_size=64),
                           speculative=SpeculativeConfig(algorithm="NEXTN", draft_model_path=d, num_steps=4)
                           if spec else SpeculativeConfig())
        llm = LLM(engine_config=cfg)
        ps = [p if stop is None else SamplingParams(**{**{f: getattr(p, f) for f in p.__struct_fields__},
                                                       "stop_token_ids": [stop[i]], "ignore_eos": False})
              for i, p in enumerate(sp)]
        return llm, llm.generate(PROMPTS[:4], ps)
    _, plain = run(False)
    refs = [p + o.token_ids for p, o in zip(PROMPTS, plain)]
    _oracle(monkeypatch, refs)                                    # right drafts: several tokens per step
    stop = [o.token_ids[7] for o in plain]
    _, plain_stop = run(False, stop)
    llm, spec_stop = run(True, stop)
    assert [o.token_ids for o in plain_stop] == [o.token_ids for o in spec_stop]
    assert all(o.finish_reason == "stop" for o in spec_stop) and llm.engine.runner.spec_accepted > 0
    llm, small = run(True, tokens=180)
    assert llm.engine.stats().num_preemptions > 0
    assert [o.token_ids for o in plain] == [o.token_ids for o in small]


@pytest.mark.parametrize("drafts", ["model", "right"])
def test_speculative_through_graph_buffers(ckpts, monkeypatch, drafts):
    """The CUDA-graph path of speculative decoding on the CPU (StepGraphs(capture=False): the static
    buffers, padding and outputs of the VERIFY and DRAFT graphs, run eagerly): plain decoding's tokens."""
    from gemma4rt.worker.cuda_graph import DRAFT, VERIFY, StepGraphs
    sp = _mixed_params()[:4]
    plain = _llm(ckpts, False).generate(PROMPTS[:4], sp)
    if drafts == "right":
        _oracle(monkeypatch, [p + o.token_ids for p, o in zip(PROMPTS, plain)])
    llm = _llm(ckpts, True)
    r = llm.engine.runner
    g = StepGraphs(r, max_bs=4, capture=False, spec_steps=r.spec_steps)
    used = []
    run, run_draft = g.run, g.run_draft
    g.run = lambda arr, kind="decode", *a: (used.append(kind), run(arr, kind, *a))[1]
    mism = []

    def checked_draft(tokens, hidden, positions, tables):
        out = run_draft(tokens, hidden, positions, tables)
        used.append(DRAFT if out is not None else None)
        if drafts == "model":              # the graph buffers' drafts are the eager drafter's
            from gemma4rt.model.context import ForwardContext
            B = tokens.shape[0]
            ctx = ForwardContext(input_ids=tokens, positions=positions,
                                 cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32), seq_lens=positions.to(torch.int32),
                                 page_tables=tables, slot_mappings={k: torch.full((B,), -1) for k in tables}, kv=r.kv,
                                 logits_indices=torch.arange(B), allow_shared_layer_skip=False)
            lm = r.model.language_model
            ref = r.drafter.draft(ctx, tokens, hidden, lm.embed_tokens.weight, lm.embed_scale(), r.spec_steps,
                                  r.sampler.sample_limit)
            mism.append(int((out != ref).sum()))
        return out
    g.run_draft = checked_draft
    r.graphs = g
    spec = llm.generate(PROMPTS[:4], sp)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        if a.logprobs is not None:
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-5)
    assert used.count(VERIFY) > 2 and used.count(DRAFT) > 2 and None not in used, used
    assert sum(mism) == 0 and (drafts != "model" or len(mism) > 10), mism
    if drafts == "right":
        assert r.spec_accepted > 0.8 * r.spec_drafted
