"""bench/run_targets.py: names, the table, and the latency half end to end on a tiny checkpoint."""
import json

from bench import run_targets as rt


def test_names():
    assert rt.full_name("E2B") == "gemma-4-E2B-it"
    assert rt.full_name("gemma-4-26B-A4B-it") == "gemma-4-26B-A4B-it"
    assert rt.short_name("google/gemma-4-31B-it") == "31B"


def test_table_targets_and_fractions():
    results = {"card": "NVIDIA H100 80GB HBM3", "models": {
        "gemma-4-E2B-it": {
            "latency": {"card": "NVIDIA H100 80GB HBM3", "date": "2026-11-28T06:00:00Z", "decode_context": 1056,
                        "rows": [{"batch_size": 1, "median_decode_ms": 1.9, "bandwidth_fraction": 0.8}],
                        "reference": {"median_decode_ms": 21.0}},
            "throughput": {"max_concurrency": 100, "output_throughput": 9000.0, "date": "2026-11-28T06:05:00Z",
                           "failed": 0, "completed": 1000}},
        "gemma-4-31B-it": {
            "latency": {"rows": [{"batch_size": 1, "median_decode_ms": 30.0, "bandwidth_fraction": 0.69}],
                        "card": "H100", "date": "2026-11-28"},
            "throughput": {"max_concurrency": 10, "output_throughput": 400.0, "failed": 2, "completed": 998}},
    }}
    table = rt.format_table(results)
    lines = table.splitlines()
    e2b_tpot = next(l for l in lines if l.startswith("| E2B batch-1 TPOT"))
    assert "| 1.90 | 21.00 | <= 2 | yes | 80% |" in e2b_tpot and "2026-11-28" in e2b_tpot
    e2b_thr = next(l for l in lines if l.startswith("| E2B cookbook c=100"))
    assert "| 9000.00 | – | >= 12000 | no |" in e2b_thr
    big = next(l for l in lines if l.startswith("| 31B batch-1"))
    assert "| <= 23 | no | 69% |" in big
    big_thr = next(l for l in lines if l.startswith("| 31B cookbook c=10"))
    assert "(2 failed of 1000)" in big_thr and "| – | – |" in big_thr     # no c=100 target at c=10


def test_latency_rows_on_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("e", text_only=True)
    res = rt.main(["--models", path, "--load-format", "auto", "--skip-throughput", "--no-reference",
                   "--input-len", "8", "--output-len", "3", "--out-dir", str(tmp_path)])
    lat = res["models"][path]["latency"]
    assert "error" not in lat, lat
    assert lat["rows"][0]["decode_steps"] == 2
    saved = json.loads((tmp_path / "targets.json").read_text())
    assert saved["models"][path]["latency"]["rows"][0]["batch_size"] == 1
    assert "batch-1 TPOT" in (tmp_path / "targets.md").read_text()


def test_kv_concurrency_is_what_the_kv_cache_holds():
    """The 31B's throughput row runs at the concurrency its KV cache holds: max_total_num_tokens over the
    recipe's longest request (2048 tokens), at most 100."""
    import http.server
    import json
    import threading

    holds = {"tokens": 0}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"max_total_num_tokens": holds["tokens"]}).encode()
            self.send_response(200 if self.path == "/get_server_info" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        for tokens, want in ((23000, 11), (10 ** 7, 100), (100, 1)):
            holds["tokens"] = tokens
            assert rt.kv_concurrency(base) == want
    finally:
        srv.shutdown()
    assert rt.CONCURRENCY["31B"] == "kv"
