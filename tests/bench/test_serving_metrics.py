"""bench/serving_metrics.py on synthetic timestamps with hand-computed expectations."""
import pytest

from bench.serving_metrics import RequestRecord, compute_metrics, format_table, peak_concurrency


def _records():
    # R1: 5 tokens, one per chunk, every 0.5 s after a 0.5 s TTFT; stream ends at 2.5 s
    r1 = RequestRecord(prompt_len=10, server_prompt_len=11, output_len=5, success=True, start=100.0, ttft=0.5,
                       latency=2.5, itl=[0.5] * 4, itl_chunk=[0.5] * 4)
    # R2: first token at 0.25 s, then one chunk carrying 2 tokens 0.5 s later; ends at 1.5 s
    r2 = RequestRecord(prompt_len=20, server_prompt_len=20, output_len=3, success=True, start=100.25, ttft=0.25,
                       latency=1.5, itl=[0.25, 0.25], itl_chunk=[0.5])
    r3 = RequestRecord(prompt_len=99, error="HTTP 500: boom")
    # R4: a single token (no TPOT)
    r4 = RequestRecord(prompt_len=30, server_prompt_len=30, output_len=1, success=True, start=100.0, ttft=0.25,
                       latency=0.25)
    return [r1, r2, r3, r4]


def test_aggregates_by_hand():
    m = compute_metrics(_records(), duration=3.0, bench_start=100.0)
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["errors"] == {"HTTP 500: boom": 1}
    assert m["total_input_tokens"] == 60 and m["total_input_tokens_server"] == 61
    assert m["total_output_tokens"] == 9
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["input_throughput"] == pytest.approx(61 / 3)          # server-reported prompt tokens win
    assert m["total_throughput"] == pytest.approx(70 / 3)
    assert m["concurrency"] == pytest.approx(4.25 / 3)
    # TPOT per request: R1 (2.5-0.5)/4 = 500 ms, R2 (1.5-0.25)/2 = 625 ms; R4 excluded
    assert m["mean_tpot_ms"] == pytest.approx(562.5)
    assert m["median_tpot_ms"] == pytest.approx(562.5)
    assert m["std_tpot_ms"] == pytest.approx(62.5)
    assert m["mean_ttft_ms"] == pytest.approx(1000 / 3)
    assert m["median_ttft_ms"] == pytest.approx(250.0)
    assert m["mean_e2e_latency_ms"] == pytest.approx(4250 / 3)
    assert m["median_e2e_latency_ms"] == pytest.approx(1500.0)
    assert m["p90_e2e_latency_ms"] == pytest.approx(2300.0)
    assert m["p99_e2e_latency_ms"] == pytest.approx(2480.0)
    # ITL per token: [500]*4 + [250, 250]; per chunk: [500]*5
    assert m["mean_itl_ms"] == pytest.approx(2500 / 6)
    assert m["median_itl_ms"] == pytest.approx(500.0)
    assert m["max_itl_ms"] == pytest.approx(500.0)
    assert m["mean_itl_chunk_ms"] == pytest.approx(500.0)
    # token times: bin [0,1): 100.25 (R4), 100.5 (R1), 100.5 and 100.75 (R2) = 4; [1,2): 3; [2,3): 2
    assert m["peak_output_throughput"] == pytest.approx(4.0)
    # R4 ends exactly when R2 starts: at most R1 + one other in flight
    assert m["peak_concurrent_requests"] == 2


def test_token_times_and_concurrency_sweep():
    r = RequestRecord(success=True, start=10.0, ttft=1.0, first_chunk_tokens=2, itl=[0.5, 0.25], latency=2.0)
    assert r.token_times() == [11.0, 11.0, 11.5, 11.75]
    overlapping = [RequestRecord(success=True, start=s, latency=1.0) for s in (0.0, 0.5, 0.9, 1.0)]
    assert peak_concurrency(overlapping) == 3


def test_usage_fallback_counts_and_table():
    recs = _records()
    recs[1].server_prompt_len = None          # one request without usage -> dataset lengths
    recs[1].usage_missing = True
    m = compute_metrics(recs, duration=3.0, bench_start=100.0)
    assert m["total_input_tokens_server"] is None
    assert m["input_throughput"] == pytest.approx(20.0)
    assert m["num_usage_missing"] == 1
    text = format_table(m, {"backend": "sglang", "request_rate": "inf", "max_concurrency": 100})
    assert "Serving Benchmark Result" in text
    assert "Mean TPOT (ms):" in text and "562.50" in text
    assert "Peak output token throughput (tok/s):" in text


def test_empty_run_does_not_crash():
    m = compute_metrics([RequestRecord(error="x")], duration=1.0, bench_start=0.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0 and m["peak_output_throughput"] == 0.0
