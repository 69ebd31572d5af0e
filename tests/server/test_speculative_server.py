"""The server with --speculative-algorithm NEXTN and a drafter (tiny E-series target and its tiny assistant):
greedy requests, concurrent, get the tokens of the offline engine without a drafter; sampled requests too."""
import concurrent.futures as cf
import json

import pytest
import torch

from .conftest import Server

PROMPTS = [[2] + [(31 * i + 7 * j) % 400 + 5 for j in range(n)] for i, n in enumerate([4, 70, 12, 33])]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from gemma4rt.tools.tiny_checkpoint import write_tiny_checkpoint
    t = str(write_tiny_checkpoint(tmp_path_factory.mktemp("srv-target"), "e", seed=0, dtype=torch.float32))
    d = str(write_tiny_checkpoint(tmp_path_factory.mktemp("srv-drafter"), "assistant", seed=1, dtype=torch.float32))
    return t, d


def info_engine(s) -> dict:
    return json.loads(s.get("/get_server_info")[1])["engine"]


def test_speculative_server_equals_plain_engine(ckpts):
    from gemma4rt import LLM
    from gemma4rt.protocol import SamplingParams
    t, d = ckpts
    params = [{"max_new_tokens": 16 + i, "temperature": 0 if i != 2 else 0.9, "seed": i, "ignore_eos": True}
              for i in range(len(PROMPTS))]
    s = Server("--model-path", t, "--max-running-requests", "4", "--chunked-prefill-size", "32",
               "--speculative-algorithm", "NEXTN", "--speculative-draft-model-path", d,
               "--speculative-num-steps", "3", timeout=300)
    try:
        def gen(i):
            st, body, _ = s.post("/generate", {"input_ids": PROMPTS[i], "sampling_params": params[i]})
            assert st == 200, body
            return json.loads(body)["output_ids"]
        with cf.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(gen, range(len(PROMPTS))))
        # SGLang's acceptance figure in /get_server_info (and /get_load): the engine sends its stats when idle
        import time
        for _ in range(100):
            state = json.loads(s.get("/get_server_info")[1])["internal_states"][0]
            if "avg_spec_accept_length" in state:
                break
            time.sleep(0.05)
        assert state["spec_verifications"] > 0 and 0 <= state["spec_accepted"]
        assert state["avg_spec_accept_length"] == 1 + state["spec_accepted"] / state["spec_verifications"]
        assert info_engine(s)["speculative"]["num_steps"] == 3
    finally:
        s.stop()
    ref = LLM(t, device="cpu", max_running_requests=4, chunked_prefill_size=32).generate(
        PROMPTS, [SamplingParams(**p) for p in params])
    assert got == [r.token_ids for r in ref]
