"""Engine.step_log: the periodic INFO line with prefill / decode step counts and times."""
import logging

from .conftest import make_engine, req, run_all


def test_step_log_counts_prefill_and_decode(caplog):
    caplog.set_level(logging.INFO, logger="gemma4rt.engine")      # the log counts only when it can show
    eng = make_engine()
    eng.step_log.interval = 1e9               # accumulate; emit by hand below
    eng.add_request(req("a", range(10, 30), max_new=5))
    eng.add_request(req("b", range(40, 47), max_new=3))
    run_all(eng)
    sl = eng.step_log
    assert sl.p_steps >= 1 and sl.p_tokens == 20 + 7
    assert sl.d_steps == 4 and sl.d_rows == 4 + 2    # 'a' decodes 4 steps, 'b' 2 (first tokens come from prefill)
    sl.interval = 0.0
    with caplog.at_level(logging.INFO, logger="gemma4rt.engine"):
        eng.add_request(req("c", range(5, 9), max_new=2))
        run_all(eng)
    lines = [r.getMessage() for r in caplog.records if "steps in" in r.getMessage()]
    assert lines and "prefill 2 (31 prompt tokens, 0 with media" in lines[0]     # all since the last line
    assert "decode 4 (1.5 rows/step" in lines[0]


def test_step_log_idle_without_info(caplog):
    caplog.set_level(logging.WARNING, logger="gemma4rt.engine")
    eng = make_engine()
    eng.add_request(req("a", range(10, 30), max_new=3))
    run_all(eng)
    assert eng.step_log.p_steps == eng.step_log.d_steps == 0


def test_step_log_shows_device_time_when_the_runner_measures_it(caplog):
    caplog.set_level(logging.INFO, logger="gemma4rt.engine")
    eng = make_engine()
    eng.step_log.interval = 1e9
    for name in ("execute", "launch", "collect"):     # as a CUDA runner sets it after each step it times
        orig = getattr(eng.runner, name, None)
        if orig is not None:
            def timed(*a, _orig=orig, **k):
                out = _orig(*a, **k)
                eng.runner.last_step_gpu_ms = 2.5
                return out
            setattr(eng.runner, name, timed)
    eng.add_request(req("a", range(10, 30), max_new=4))
    run_all(eng)
    sl = eng.step_log
    # each timed step counts once (with overlap scheduling the noop runner's last step is collected untimed)
    assert sl.d_steps == 3 and sl.d_gpu[0] == 2.5 * sl.d_gpu[1] and sl.d_gpu[1] >= sl.d_steps - 1
    assert sl.p_gpu[1] <= sl.p_steps
    eng.step_log.interval = 0.0
    eng.add_request(req("b", range(5, 9), max_new=2))
    run_all(eng)
    lines = [r.getMessage() for r in caplog.records if "steps in" in r.getMessage()]
    assert lines and "decode 2.50 ms/step on the device" in lines[0]


def test_profile_window_writes_the_kernel_table(tmp_path, monkeypatch):
    import pytest

    from gemma4rt.worker.profiling import parse_window
    path = tmp_path / "prof.txt"
    monkeypatch.setenv("GEMMA4RT_PROFILE_STEPS", f"1:3:{path}")
    eng = make_engine()
    eng.add_request(req("a", range(10, 30), max_new=8))
    run_all(eng)
    head = path.read_text().splitlines()[0]
    assert head.startswith("engine steps 1-3: 0 with prompt tokens (0 tokens), 3 pure decode (1.0 rows/step)")
    assert "us/step" in path.read_text().splitlines()[1]
    assert parse_window("") is None and parse_window("5:2:/x:y") == (5, 2, "/x:y")
    for bad in ("5:2", "a:2:/x", "5:0:/x", "5:2:"):
        with pytest.raises(ValueError, match="START:COUNT:PATH"):
            parse_window(bad)
