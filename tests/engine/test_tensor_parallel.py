"""Tensor parallelism on the CPU: two ranks (gloo) against one, on tiny checkpoints of every text family.
Each rank holds half the heads and half of every MLP / expert width; the sharded forward must give the
same greedy tokens and the same log-probabilities as the unsharded one."""
import pytest
import torch

from gemma4rt import LLM
from gemma4rt.model.parallel import TP, check_tp, shard
from gemma4rt.model_config import load_model_config
from gemma4rt.protocol import SamplingParams

PROMPTS = [[2, 17, 33, 5, 9, 41, 7], [2, 100, 3], list(range(2, 60))]


@pytest.mark.parametrize("family", ["dense", "moe", "e", "unified"])
def test_two_ranks_match_one(tiny_checkpoint, family):
    path = tiny_checkpoint(family, text_only=family in ("dense", "moe"))
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=True, top_logprobs=3, ignore_eos=True)
    one = LLM(path, device="cpu", seed=0).generate(PROMPTS, sp)
    llm = LLM(path, device="cpu", seed=0, tp_size=2)
    try:
        assert llm.engine.runner.tp.size == 2
        two = llm.generate(PROMPTS, sp)
        # a second batch through the same ranks: the followers' copy of the batch stays in step
        again = llm.generate(PROMPTS[:1], sp)
    finally:
        llm.close()
    for a, b in zip(one, two):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-4)
    assert again[0].token_ids == one[0].token_ids


def test_shards_tile_the_full_tensors(tiny_checkpoint):
    """Every rank's slices of q/k/v/o, MLP and expert weights put back together give the full tensor."""
    cfg = load_model_config(tiny_checkpoint("moe", text_only=True)).text
    n = 2
    g = torch.Generator().manual_seed(0)
    H, D, d = cfg.num_heads, cfg.layers[0].head_dim, cfg.hidden_size
    q = torch.randn(H * D, d, generator=g)
    parts = [shard("language_model.layers.0.self_attn.q_proj.weight", q, cfg, TP(r, n)) for r in range(n)]
    assert torch.equal(torch.cat(parts), q)
    o = torch.randn(d, H * D, generator=g)
    parts = [shard("language_model.layers.0.self_attn.o_proj.weight", o, cfg, TP(r, n)) for r in range(n)]
    assert torch.equal(torch.cat(parts, 1), o)
    E, inter = cfg.num_experts, cfg.moe_intermediate_size
    gu = torch.randn(E, 2 * inter, d, generator=g)
    parts = [shard("language_model.layers.0.experts.gate_up_proj", gu, cfg, TP(r, n)) for r in range(n)]
    half = inter // n
    assert torch.equal(torch.cat([p[:, :half] for p in parts], 1), gu[:, :inter])      # gate rows
    assert torch.equal(torch.cat([p[:, half:] for p in parts], 1), gu[:, inter:])      # up rows
    kvh = cfg.layers[0].num_kv_heads
    k = torch.randn(kvh * D, d, generator=g)
    ks = [shard("language_model.layers.0.self_attn.k_proj.weight", k, cfg, TP(r, n)) for r in range(n)]
    if kvh % n == 0:
        assert torch.equal(torch.cat(ks), k)
    else:                                  # fewer KV heads than ranks: each rank keeps the head it reads
        assert all(torch.equal(x, k[:D]) for x in ks)


def test_check_tp_explains_what_does_not_divide(tiny_checkpoint):
    cfg = load_model_config(tiny_checkpoint("dense", text_only=True)).text
    assert check_tp(cfg, 1) is None and check_tp(cfg, 2) is None
    assert "attention heads" in check_tp(cfg, 3)
    assert check_tp(cfg, 0) is not None


def test_dummy_weights_of_each_rank_are_its_slice_of_the_one_gpu_model(tiny_checkpoint):
    """--load-format dummy with --tp: every rank holds exactly its shard of the weights that one GPU draws
    (so a --tp run and a one-GPU run serve the same model), and the matrices have std 1/sqrt(fan-in)."""
    from gemma4rt.model.gemma4 import Gemma4Model
    from gemma4rt.model.loader import init_dummy_weights
    from gemma4rt.model.parallel import shard
    cfg = load_model_config(tiny_checkpoint("moe", text_only=True))

    def params(tp):
        with torch.device("meta"):
            m = Gemma4Model(cfg, tp)
        init_dummy_weights(m, torch.float32, torch.device("cpu"), seed=3, tp=tp)
        return dict(m.named_parameters())

    one = params(TP(0, 1))
    sharded = 0
    for r in range(2):
        part = params(TP(r, 2))
        assert part.keys() == one.keys()
        for n, p in part.items():
            want = shard(n, one[n], cfg.text, TP(r, 2))
            sharded += want.shape != one[n].shape
            assert torch.equal(p, want), n
    assert sharded >= 2 * 6, sharded          # q/k/v/o, MLP and expert matrices of every layer
    o = one["language_model.layers.0.self_attn.o_proj.weight"]
    assert abs(o.std().item() * o.shape[1] ** 0.5 - 1.0) < 0.15
    with torch.device("meta"):
        m = Gemma4Model(cfg, TP(0, 1))
    init_dummy_weights(m, torch.float32, torch.device("cpu"), seed=4)
    assert not torch.equal(m.get_parameter("language_model.embed_tokens.weight"),
                           one["language_model.embed_tokens.weight"])


def test_a_dead_rank_fails_steps_instead_of_hanging(tiny_checkpoint):
    from gemma4rt.protocol import AddRequest
    llm = LLM(tiny_checkpoint("dense", text_only=True), device="cpu", seed=0, tp_size=2)
    runner = llm.engine.runner
    try:
        proc = runner.tp_procs[0]
        proc.kill()
        proc.join(10)
        llm.engine.add_request(AddRequest(rid="r", prompt_token_ids=[2, 5, 6],
                                          sampling=SamplingParams(max_new_tokens=2)))
        outs = llm.engine.step().outputs
        assert outs and outs[0].finish_reason == "error" and "exited" in outs[0].error
    finally:
        llm.close()


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_leaving_the_group_frees_graphs_first_and_cannot_hang(monkeypatch, caplog, backend):
    """Leaving a tensor-parallel group frees the CUDA graphs first; over NCCL it aborts the group (destroy
    hangs with NCCL work captured in graphs, pytorch/pytorch#115388), over gloo it destroys it; a leave
    that never returns costs a bounded wait."""
    import threading
    import time

    import torch.distributed as dist

    from gemma4rt.worker import tp_worker

    order, stuck = [], threading.Event()

    class Graphs:
        def release(self):
            order.append("graphs")

    class Runner:
        graphs = Graphs()

    def hang(name):
        def f():
            order.append(name)
            stuck.wait(30)
        return f

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: backend)
    monkeypatch.setattr(dist, "destroy_process_group", hang("destroy"))
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", hang("abort"))
    runner = Runner()
    t0 = time.perf_counter()
    with caplog.at_level("WARNING"):
        tp_worker._leave(runner, timeout=0.3)
    stuck.set()
    assert time.perf_counter() - t0 < 5
    assert order == ["graphs", "abort" if backend == "nccl" else "destroy"] and runner.graphs is None
    assert "no answer" in caplog.text
