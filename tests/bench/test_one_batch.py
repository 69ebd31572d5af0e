"""bench/one_batch.py on the CPU with a tiny checkpoint, and bench/roofline.py's byte counts."""
import json

import pytest

from bench import one_batch, roofline


def test_one_batch_tiny_cpu(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("e", text_only=True)
    out = tmp_path / "ob.jsonl"
    res = one_batch.main(["--model-path", path, "--device", "cpu", "--dtype", "float32", "--batch-size", "1", "3",
                          "--input-len", "40", "--output-len", "4", "--reference", "--output-file", str(out),
                          "--profile", str(tmp_path / "prof.txt"), "--profile-prompt", str(tmp_path / "pp.txt"),
                          "--profile-prompt-len", "12"])
    rows = {r["batch_size"]: r for r in res["rows"]}
    assert set(rows) == {1, 3}
    for bs, r in rows.items():
        assert r["generated_tokens"] == bs * 4
        assert r["prefill_steps"] == 1                # the whole batch prefills in one step
        assert r["decode_steps"] == 3                 # output_len - 1 (the prefill samples the first token)
        assert 0 < r["median_decode_ms"] <= r["median_decode_engine_ms"]
        assert r["prefill_throughput"] == pytest.approx(bs * 40 / (r["prefill_latency_ms"] / 1e3))
        assert r["decode_throughput"] == pytest.approx(bs / (r["median_decode_ms"] / 1e3))
        assert r["bytes_per_step"] > 0 and r["bandwidth_fraction"] is None      # no GPU: no bandwidth
    ref = res["reference"]
    assert "error" not in ref, ref
    assert ref["median_decode_ms"] > 0 and ref["static_cache"] is False
    assert res["decode_context"] == 42
    assert json.loads(out.read_text())["rows"][0]["batch_size"] == 1
    assert "batch-1 TPOT at context ~42: ours" in capsys.readouterr().out
    prof = res["profile"]                       # CPU: no kernels, but the steps were profiled and timed
    assert "error" not in prof, prof
    assert prof["wall_ms"] > 0 and prof["kernels_per_step"] == 0
    assert (tmp_path / "prof.txt").read_text().startswith("decode at batch 1, 8 steps (1 tokens/step)")
    pp = res["profile_prompt"]                  # every profiled step: the 12-token prompt + 1 decode row
    assert "error" not in pp, pp
    assert pp["steps"] == 8 and pp["tokens_per_step"] == 13 and pp["wall_ms"] > 0
    assert (tmp_path / "pp.txt").read_text().startswith(
        "steps with one 12-token prompt beside 1 decode rows, 8 steps (13 tokens/step)")


def test_one_batch_overlap_schedule_cpu(tiny_checkpoint):
    """--enable-overlap-schedule: the engine overlaps, every decode step gets its launch period (the last
    step's ends with no next launch, so one fewer), the prompt step is not timed."""
    import math
    path = tiny_checkpoint("e", text_only=True)
    res = one_batch.main(["--model-path", path, "--device", "cpu", "--dtype", "float32", "--batch-size", "2",
                          "--input-len", "40", "--output-len", "6", "--enable-overlap-schedule"])
    r = res["rows"][0]
    assert r["generated_tokens"] == 2 * 6
    assert r["prefill_steps"] == 1 and r["decode_steps"] == 4
    assert r["median_decode_ms"] > 0 and math.isnan(r["prefill_latency_ms"])


def test_step_timer_classifies_prefill_and_decode():
    class Plan:
        def __init__(self, sizes):
            self.scheduled = [type("S", (), {"num_tokens": n})() for n in sizes]

    class Runner:
        def execute(self, plan):
            return len(plan.scheduled)

    r = Runner()
    t = one_batch.StepTimer(r, lambda: None)
    assert r.execute(Plan([5, 1])) == 2 and r.execute(Plan([1, 1, 1])) == 3
    assert [(p, n, k) for p, n, k, _ in t.records] == [(True, 6, 2), (False, 3, 3)]


@pytest.mark.parametrize("name, weight_gb, params_b", [
    ("gemma-4-E2B-it", 4.56, 2.28), ("gemma-4-E4B-it", 9.29, 4.64), ("gemma-4-12B-it", 23.8, 11.91),
    ("gemma-4-31B-it", 61.4, 30.70), ("gemma-4-26B-A4B-it", 7.64, 3.82)])
def test_roofline_bytes_match_reference_table(name, weight_gb, params_b):
    # performance-targets.md §3.2: weight bytes / params read per batch-1 decode step
    cfg = roofline.load_model_config(name)
    d = roofline.decode_bytes(cfg, context=1024, batch_size=1)
    assert d.weight_bytes / 1e9 == pytest.approx(weight_gb, rel=0.01)
    assert d.params_read / 1e9 == pytest.approx(params_b, rel=0.01)
    # §3.2 "min TPOT, practical 3.0 TB/s, +KV@1k": E2B 1.52, E4B 3.11, 12B 8.06, 31B 20.77, 26B 2.62 ms
    expect_ms = {"gemma-4-E2B-it": 1.52, "gemma-4-E4B-it": 3.11, "gemma-4-12B-it": 8.06,
                 "gemma-4-31B-it": 20.77, "gemma-4-26B-A4B-it": 2.62}[name]
    assert d.min_step_ms(3.0e12) == pytest.approx(expect_ms, abs=0.015)


def test_moe_experts_touched_and_kv_formula():
    assert roofline.experts_touched(128, 8, 1) == pytest.approx(8.0)
    assert roofline.experts_touched(128, 8, 64) == pytest.approx(126.0, abs=1.0)       # §3.3: ~126 at B=64
    cfg = roofline.load_model_config("gemma-4-26B-A4B-it")
    b1 = roofline.decode_bytes(cfg, 1024, 1)
    b64 = roofline.decode_bytes(cfg, 1024, 64)
    assert b64.weight_bytes / 1e9 == pytest.approx(49.7, rel=0.02)     # nearly every expert read
    assert b64.kv_bytes == 64 * b1.kv_bytes
    # by hand for the tiny `e` family: sliding window 4; layers 0,1,3 sliding (1 KV head x 16),
    # layers 2,4 full (1 x 32), layers 4..6 KV-shared -> cache owners 0,1,2,3
    from gemma4rt.model_config import parse_model_config
    from gemma4rt.tools.tiny_checkpoint import config_dict
    tiny = parse_model_config(config_dict("e"))
    # 3 sliding owners x K,V x 4 positions x 16 dims x 2 B = 768; 1 full owner x 2 x 10 x 32 x 2 B = 1280
    assert roofline.kv_bytes_per_seq(tiny.text, 10, 2) == 768 + 1280
    assert roofline.kv_bytes_per_seq(tiny.text, 100, 2) > roofline.kv_bytes_per_seq(tiny.text, 10, 2)


def test_one_batch_tensor_parallel_cpu(tiny_checkpoint):
    """--tp 2 on the CPU (gloo): the same greedy batch decodes through two ranks, which stop afterwards."""
    import torch.distributed as dist
    path = tiny_checkpoint("dense", text_only=True)
    res = one_batch.main(["--model-path", path, "--device", "cpu", "--dtype", "float32", "--batch-size", "2",
                          "--input-len", "20", "--output-len", "3", "--tp", "2"])
    assert res["tp"] == 2
    r = res["rows"][0]
    assert r["generated_tokens"] == 6 and r["decode_steps"] == 2
    assert not dist.is_initialized()          # the ranks were stopped and the group left
