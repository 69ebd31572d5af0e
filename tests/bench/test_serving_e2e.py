"""bench/serving.py end to end against an in-test stub server (not the real gemma4rt server)."""
import json

import pytest

from bench import serving
from bench.workloads import sample_random_requests

FIRST_DELAY = 0.03     # the stub's (conftest.Stub) delay before the first token
STEP_DELAY = 0.004     # and between chunks


def test_native_generate_backend(stub, tmp_path):
    out = tmp_path / "res.jsonl"
    res = serving.main(["--backend", "sglang", "--base-url", stub.url, "--num-prompts", "6",
                        "--random-input-len", "32", "--random-output-len", "9", "--random-range-ratio", "0.5",
                        "--max-concurrency", "2", "--output-file", str(out)])
    expect = sample_random_requests(6, 32, 9, 0.5, seed=1)
    assert res["completed"] == 6 and res["failed"] == 0
    assert res["total_output_tokens"] == sum(r.output_len for r in expect)
    assert res["total_input_tokens"] == sum(r.prompt_len for r in expect)
    bodies = stub.bodies["generate"]
    assert len(bodies) == 7                                  # 1 warm-up + 6 measured
    assert [b["input_ids"] for b in bodies[1:]] == [r.input_ids for r in expect]   # order of dispatch
    for b in bodies:
        sp = b["sampling_params"]
        assert b["stream"] is True and sp["ignore_eos"] is True and sp["temperature"] == 0.0
    assert stub.max_in_flight <= 2
    assert res["mean_ttft_ms"] >= FIRST_DELAY * 1000
    # the stub sends one token, then chunks of two (the last may carry one): per-token ITL spreads
    # each chunk's gap over its tokens, so per request the per-token gaps sum to the per-chunk ones
    assert res["mean_itl_chunk_ms"] >= STEP_DELAY * 1000
    n_tok = sum(r.output_len - 1 for r in expect)
    n_chunk = sum(r.output_len // 2 for r in expect)
    assert res["mean_itl_ms"] * n_tok == pytest.approx(res["mean_itl_chunk_ms"] * n_chunk, rel=1e-6)
    line = json.loads(out.read_text().strip().splitlines()[-1])
    assert line["completed"] == 6 and line["backend"] == "sglang" and line["request_rate"] == "inf"
    assert res["accept_length"] is None                      # the stub has no /get_server_info


def test_accept_length_from_the_server(make_stub, capsys):
    s = make_stub(accept_length=2.75)
    res = serving.main(["--backend", "sglang", "--base-url", s.url, "--num-prompts", "2",
                        "--random-input-len", "8", "--random-output-len", "4"])
    assert res["accept_length"] == 2.75 and "Accept length:" in capsys.readouterr().out


def test_chat_image_backend_skips_role_chunk(stub):
    res = serving.main(["--backend", "sglang-oai-chat", "--base-url", stub.url, "--dataset-name", "image",
                        "--image-count", "2", "--image-resolution", "720p", "--random-input-len", "16",
                        "--random-output-len", "6", "--num-prompts", "3", "--warmup-requests", "0"])
    assert res["completed"] == 3 and res["model"] == "stub-model"
    expect = sample_random_requests(3, 16, 6, 0.0, seed=1)
    assert res["total_output_tokens"] == sum(r.output_len for r in expect)       # from usage
    assert res["total_input_tokens_server"] == sum(1000 + r.output_len for r in expect)
    # the role chunk comes at once, the first content chunk after FIRST_DELAY: TTFT must count the latter
    assert res["mean_ttft_ms"] >= FIRST_DELAY * 1000
    for b in stub.bodies["chat"]:
        assert b["stream_options"] == {"include_usage": True} and b["model"] == "stub-model"
        parts = b["messages"][0]["content"]
        imgs = [p for p in parts if p["type"] == "image_url"]
        assert len(imgs) == 2 and all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in imgs)
        assert parts[-1]["type"] == "text" and parts[-1]["text"]


def test_completions_without_usage_and_eos_enabled(make_stub):
    s = make_stub(usage=False)
    assert (s.FIRST_DELAY, s.STEP_DELAY) == (FIRST_DELAY, STEP_DELAY)
    res = serving.main(["--backend", "vllm", "--base-url", s.url, "--num-prompts", "4",
                        "--random-input-len", "8", "--random-output-len", "5", "--random-range-ratio", "1.0",
                        "--disable-ignore-eos", "--warmup-requests", "0", "--model", "m"])
    assert res["completed"] == 4 and res["num_usage_missing"] == 4
    assert res["total_output_tokens"] == 20                 # fell back to the requested lengths
    for b in s.bodies["completions"]:
        assert b["ignore_eos"] is False and b["model"] == "m" and len(b["prompt"]) == 8
        assert all(isinstance(t, int) for t in b["prompt"])       # token-id prompt without a tokenizer
    assert res["median_tpot_ms"] >= STEP_DELAY * 1000


def test_http_errors_are_failures(make_stub):
    s = make_stub(fail=True)
    with pytest.raises(RuntimeError, match="warm-up failed"):
        serving.main(["--backend", "sglang", "--base-url", s.url, "--num-prompts", "2",
                      "--random-input-len", "8", "--random-output-len", "4"])
    res = serving.main(["--backend", "sglang", "--base-url", s.url, "--num-prompts", "2",
                        "--random-input-len", "8", "--random-output-len", "4", "--warmup-requests", "0"])
    assert res["completed"] == 0 and res["failed"] == 2
    assert any("HTTP 400" in e for e in res["errors"])


def test_continuous_usage_gives_exact_tokens_per_chunk(stub):
    res = serving.main(["--backend", "sglang-oai", "--base-url", stub.url, "--num-prompts", "4",
                        "--random-input-len", "8", "--random-output-len", "9", "--random-range-ratio", "1.0",
                        "--continuous-usage-stats", "--warmup-requests", "0"])
    assert all(b["stream_options"]["continuous_usage_stats"] is True for b in stub.bodies["completions"])
    assert res["completed"] == 4 and res["total_output_tokens"] == 36
    # 9 tokens = 1 + 4 chunks of 2: four chunk gaps per request, eight per-token gaps of half the size
    assert res["mean_itl_ms"] == pytest.approx(res["mean_itl_chunk_ms"] / 2, rel=1e-6)


def test_stream_with_usage_but_no_text(make_stub):
    # random weights can emit tokens that detokenise to nothing: the server then sends only the role,
    # finish and usage chunks; the request still counts, with its tokens from usage
    s = make_stub(empty_text=True)
    res = serving.main(["--backend", "sglang-oai-chat", "--base-url", s.url, "--num-prompts", "2",
                        "--random-input-len", "8", "--random-output-len", "5", "--random-range-ratio", "1.0",
                        "--warmup-requests", "0"])
    assert res["completed"] == 2 and res["total_output_tokens"] == 10
    assert res["mean_ttft_ms"] >= FIRST_DELAY * 1000
