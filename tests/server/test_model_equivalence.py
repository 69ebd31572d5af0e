"""Greedy output of the demo model (the lead's ModelRunner): server == offline LLM == transformers'
generate, also across the sliding window, chunked prefill and a prefix-cache hit."""
import json

import pytest

from .conftest import Server

N = 24


@pytest.fixture(scope="module")
def demo_server():
    pytest.importorskip("gemma4rt.worker.model_runner")
    s = Server("--max-running-requests", "8", "--chunked-prefill-size", "32", timeout=300)
    yield s
    s.stop()


def _gen(server, prompt):
    st, body, _ = server.post("/generate", {"input_ids": prompt, "sampling_params": {
        "max_new_tokens": N, "temperature": 0, "ignore_eos": True}})
    assert st == 200, body
    return json.loads(body)


def test_server_equals_llm_equals_transformers(demo_server):
    import torch
    from openai import OpenAI

    from gemma4rt import llm as llm_mod
    from gemma4rt.protocol import SamplingParams
    from gemma4rt.tools.tiny_checkpoint import demo_checkpoint_path, load_tiny_model

    prompts = [[2, 105, 300, 107, 10, 11, 12, 13, 106, 107, 105, 400, 107],
               [2] + [(37 * i) % 400 + 5 for i in range(70)]]              # 71 tokens: 3 prefill chunks
    outs = [_gen(demo_server, p) for p in prompts]
    ids = [o["output_ids"] for o in outs]
    assert all(len(x) == N for x in ids)
    again = _gen(demo_server, prompts[1])                                 # served from the prefix cache
    assert again["meta_info"]["cached_tokens"] > 0 and again["output_ids"] == ids[1]

    c = OpenAI(base_url=demo_server.url + "/v1", api_key="x", _strict_response_validation=True, max_retries=0)
    r = c.completions.create(model="default", prompt=prompts[0], max_tokens=N, temperature=0,
                             extra_body={"ignore_eos": True})
    llm = llm_mod.LLM()
    offline = llm.generate(prompts, SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in offline] == ids
    assert r.choices[0].text == llm.tokenizer.decode(ids[0], skip_special_tokens=True)

    model = load_tiny_model(demo_checkpoint_path())
    eos = set(llm.model_info.eos_token_ids)
    with torch.no_grad():
        for p, got in zip(prompts, ids):
            g = model.generate(torch.tensor([p]), max_new_tokens=N, do_sample=False, min_new_tokens=N)
            ref = g[0, len(p):].tolist()
            if eos & set(got):          # HF's min_new_tokens masks EOS where ignore_eos samples it
                k = min(i for i, t in enumerate(got) if t in eos)
                assert ref[:k] == got[:k]
            else:
                assert ref == got


def test_echo_logprobs_across_prefill_chunks(demo_server):
    """`echo` + `logprobs` with a prompt prefilled in 3 chunks of 32: every prompt token after the
    first has its logprob (the chunk boundaries included), equal to the unchunked model's."""
    import torch

    from gemma4rt.llm import LLM
    prompt = [2] + [(37 * i) % 400 + 5 for i in range(70)]
    st, body, _ = demo_server.post("/v1/completions", {"model": "default", "prompt": prompt, "max_tokens": 1,
                                                       "echo": True, "logprobs": 1, "temperature": 0})
    assert st == 200, body
    got = json.loads(body)["choices"][0]["logprobs"]["token_logprobs"]
    assert len(got) == len(prompt) + 1 and got[0] is None and all(isinstance(x, float) for x in got[1:])
    logits = LLM().engine.runner.score(prompt).float()
    want = torch.log_softmax(logits[:-1], -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert max(abs(a - b) for a, b in zip(got[1:len(prompt)], want.tolist())) < 1e-4
