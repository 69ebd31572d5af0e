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
