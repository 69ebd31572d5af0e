"""The offline LLM API: the scheduler + model runner path (chunked prefill, continuous batching,
paged KV with sliding pages released) against transformers and against itself."""
import pytest
import torch

from gemma4rt import LLM, SamplingParams


@pytest.fixture(scope="module")
def e_ckpt(tiny_checkpoint):
    return tiny_checkpoint("e")


def _hf_greedy(path, ids, n):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        g = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return g[0, len(ids):].tolist()


@pytest.mark.parametrize("family", ["e", "moe"])
def test_llm_greedy_equals_transformers_with_chunking_and_batching(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    llm = LLM(path, device="cpu", dtype="float32", chunked_prefill_size=5, page_size=2)
    g = torch.Generator().manual_seed(3)
    prompts = [[2] + torch.randint(5, 400, (n,), generator=g).tolist() for n in (12, 3, 20, 7)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=32, min_new_tokens=32)
    outs = llm.generate(prompts, sp)
    for p, o in zip(prompts, outs):
        assert o.finish_reason == "length"
        assert o.token_ids == _hf_greedy(path, p, 32)
    alone = [llm.generate([p], sp)[0].token_ids for p in prompts]
    assert alone == [o.token_ids for o in outs]


def test_seeded_sampling_is_reproducible(e_ckpt):
    llm = LLM(e_ckpt, device="cpu", dtype="float32")
    p = [2, 40, 41, 42, 43]
    a = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=24, seed=11))[0]
    # the same seed inside a different batch gives the same tokens
    batch = llm.generate([[2, 9, 9], p], [SamplingParams(temperature=1.0, max_new_tokens=5, seed=3),
                                            SamplingParams(temperature=1.0, top_p=0.95, top_k=50,
                                                           max_new_tokens=24, seed=11)])
    assert batch[1].token_ids == a.token_ids
    c = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=24, seed=12))[0]
    assert c.token_ids != a.token_ids


def test_logprobs_and_stop_tokens(e_ckpt):
    llm = LLM(e_ckpt, device="cpu", dtype="float32")
    o = llm.generate([[2, 50, 60, 70]], SamplingParams(temperature=0.0, max_new_tokens=6, logprobs=True,
                                                        top_logprobs=3, ignore_eos=True))[0]
    assert len(o.logprobs) == len(o.token_ids) == 6
    for tok, lp, top in zip(o.token_ids, o.logprobs, o.top_logprobs):
        assert top[0][0] == tok and abs(top[0][1] - lp) < 1e-5      # greedy = most likely
        assert lp <= 0 and top[0][1] >= top[1][1] >= top[2][1]
    first = o.token_ids[0]
    s = llm.generate([[2, 50, 60, 70]], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=[first]))[0]
    assert s.token_ids == [first] and s.finish_reason == "stop"


def test_chat_uses_the_checkpoint_template(e_ckpt):
    llm = LLM(e_ckpt, device="cpu", dtype="float32")
    text = llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<bos><|turn>user\nHi<turn|>\n<|turn>model\n")
    o = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0.0, max_new_tokens=4))[0]
    assert len(o.token_ids) >= 1 and o.finish_reason in ("stop", "length")


def test_close_frees_the_runner_and_refuses_to_generate(e_ckpt):
    """close() drops the runner's weights and KV pools (on a GPU, their memory goes back at once; see
    tests/gpu/test_model_bf16.py), a later generate() says the LLM is closed, and a second close() is harmless."""
    import weakref
    llm = LLM(e_ckpt, device="cpu", dtype="float32")
    out = llm.generate([[2, 17, 33]], SamplingParams(temperature=0.0, max_new_tokens=2))
    assert len(out[0].token_ids) == 2
    model = weakref.ref(llm.engine.runner.model)
    llm.close()
    assert model() is None and llm.engine.runner.kv is None
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[2, 17, 33]], SamplingParams(max_new_tokens=2))
    llm.close()
