"""Command-line parsing (SGLang names, aliases, ignored flags) and the --chat-template override."""
import asyncio

import pytest

from gemma4rt.cli import parse_args


def test_flags_and_aliases():
    eng, srv, warn = parse_args(["--model", "/m", "--tp-size", "1", "--max-model-len", "1000",
                                 "--gpu-memory-utilization", "0.5", "--chunked-prefill-size", "-1",
                                 "--disable-radix-cache", "--port", "1234", "--api-key", "k", "--enable-metrics",
                                 "--reasoning-parser", "gemma4", "--random-seed", "7", "--page-size", "32"])
    assert eng.model_path == "/m" and eng.parallel.tp == 1 and eng.context_length == 1000 and eng.seed == 7
    assert eng.cache.mem_fraction_static == 0.5 and eng.cache.disable_radix_cache and eng.cache.page_size == 32
    assert eng.scheduler.chunked_prefill_size == -1
    assert srv.port == 1234 and srv.api_key == "k" and srv.enable_metrics and srv.reasoning_parser == "gemma4"
    assert warn == []
    eng, srv, _ = parse_args(["--tensor-parallel-size", "1", "--model-path", "x"])
    assert eng.parallel.tp == 1 and srv.port == 30000 and srv.host == "127.0.0.1" and eng.model_path == "x"
    assert parse_args(["--tp", "2"])[0].parallel.tp == 2
    assert parse_args(["--cuda-graph-max-tokens", "1024"])[0].cuda_graph_max_tokens == 1024
    for bad in (["--tp", "0"], ["--kv-cache-dtype", "fp8_e4m3"], ["--limit-mm-per-prompt", "[1]"],
                ["--limit-mm-per-prompt", '{"gif": 1}'], ["--mm-processor-kwargs", '{"max_soft_tokens": 99}']):
        with pytest.raises(SystemExit):
            parse_args(bad)
    _, srv, _ = parse_args(["--limit-mm-per-prompt", '{"image": 2}', "--mm-processor-kwargs",
                            '{"max_soft_tokens": 560}', "--allow-private-media-urls"])
    assert srv.limit_mm_per_prompt == {"image": 2} and srv.mm_processor_kwargs == {"max_soft_tokens": 560}
    assert srv.allow_private_media_urls
    _, srv, _ = parse_args(["--default-chat-template-kwargs", '{"enable_thinking": true}'])
    assert srv.default_chat_template_kwargs == {"enable_thinking": True}
    assert parse_args([])[0].model_path is None


def test_ignored_sglang_flags_warn_unknown_fail():
    eng, _, warn = parse_args(["--attention-backend", "fa3", "--enable-mixed-chunk", "--grammar-backend=xgrammar",
                               "--port", "5"])
    assert len(warn) == 3 and any("--attention-backend" in w for w in warn)
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--tool-call-parser", "hermes"])


def test_vllm_speculative_config_and_async_scheduling():
    """vLLM's --speculative-config JSON sets the same speculative settings as SGLang's flags (unknown keys
    warn, another method, a missing model or both forms at once fail); --async-scheduling is vLLM's name
    for overlap scheduling."""
    eng, _, warn = parse_args(["--speculative-config",
                               '{"model": "google/gemma-4-31B-it-assistant", "num_speculative_tokens": 4}'])
    sp = eng.speculative
    assert (sp.algorithm, sp.draft_model_path, sp.num_steps) == ("NEXTN", "google/gemma-4-31B-it-assistant", 4)
    assert warn == []
    flags = parse_args(["--speculative-algorithm", "NEXTN", "--speculative-draft-model-path",
                        "google/gemma-4-31B-it-assistant", "--speculative-num-steps", "4"])[0].speculative
    assert flags.draft_model_path == sp.draft_model_path and flags.num_steps == sp.num_steps
    eng, _, warn = parse_args(["--speculative-config", '{"model": "m", "method": "mtp", "max_model_len": 9}'])
    assert eng.speculative.num_steps == 3 and len(warn) == 1 and "max_model_len" in warn[0]
    for bad in ('{"model": "m", "method": "ngram"}', '{"num_speculative_tokens": 2}',
                '{"model": "m", "num_speculative_tokens": 9}', '{"model": "m", "num_speculative_tokens": "2"}'):
        with pytest.raises(SystemExit):
            parse_args(["--speculative-config", bad])
    with pytest.raises(SystemExit):
        parse_args(["--speculative-config", '{"model": "m"}', "--speculative-draft-model-path", "m"])
    assert parse_args(["--async-scheduling"])[0].scheduler.overlap_schedule is True
    assert parse_args([])[0].scheduler.overlap_schedule is None


def test_vllm_aliases():
    """vLLM's spellings of flags gemma4rt implements, and of behaviour it always has (accepted silently)."""
    eng, _, warn = parse_args(["--max-num-seqs", "7", "--max-num-batched-tokens", "4096", "--seed", "3",
                               "--block-size", "32", "--enforce-eager", "--no-enable-prefix-caching",
                               "--enable-chunked-prefill", "--enable-prefix-caching", "--disable-log-requests",
                               "--swap-space", "4"])
    assert eng.scheduler.max_running_requests == 7 and eng.scheduler.chunked_prefill_size == 4096
    assert eng.seed == 3 and eng.cache.page_size == 32 and eng.disable_cuda_graph and eng.cache.disable_radix_cache
    assert len(warn) == 2 and all("ignored" in w for w in warn), warn


def test_chat_template_override(tmp_path):
    from gemma4rt.frontend.tokenizer import TokenizerManager
    from gemma4rt.worker.noop_runner import noop_tokenizer_path
    p = tmp_path / "t.jinja"
    p.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    tm = TokenizerManager(noop_tokenizer_path(), chat_template=str(p))
    text, ids = asyncio.run(tm.render_chat([{"role": "user", "content": "hi"}], None, {}))
    assert text == "[user]hi" and tm.decode(ids) == "[user]hi"
    default = TokenizerManager(noop_tokenizer_path())
    text, _ = asyncio.run(default.render_chat([{"role": "user", "content": "hi"}], None,
                                              {"add_generation_prompt": True}))
    assert text.startswith("<bos>") and "<|turn>user\nhi<turn|>" in text


def test_every_flag_is_documented_in_the_readme():
    """The README's flag table names every flag the server takes (aliases included)."""
    import os

    from gemma4rt.cli import FLAGS
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    missing = [f for flags, *_ in FLAGS for f in flags if f"`{f}`" not in readme]
    assert "`--speculative-config`" in readme
    assert not missing, missing


def test_force_include_usage_server():
    """--enable-force-include-usage: a stream without stream_options still ends with the usage chunk."""
    import json

    from .conftest import NOOP, Server
    s = Server(*NOOP, "--enable-force-include-usage")
    try:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})):
            st, raw, _ = s.post(path, dict(body, max_tokens=3, stream=True))
            assert st == 200
            chunks = [json.loads(line[6:]) for line in raw.decode().splitlines()
                      if line.startswith("data: {")]
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3, chunks[-1]
    finally:
        s.stop()
