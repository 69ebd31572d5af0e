"""Incremental detokenization and stop strings (unit level, with the tiny tokenizer)."""
import pytest

from gemma4rt.frontend.textproc import IncrementalDetokenizer, StopStrings


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    from gemma4rt.worker.noop_runner import noop_tokenizer_path
    return AutoTokenizer.from_pretrained(noop_tokenizer_path())


@pytest.mark.parametrize("fast", [True, False])
def test_detok_never_splits_utf8(tok, fast):
    text = "héllo wörld 你好 — ok <turn|> end"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, skip_special_tokens=False)
    if not fast:
        d._stream = None
    pieces = [d.add([t]) for t in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") >= 3           # multi-byte chars were held back


def test_detok_skip_special_and_incomplete_tail(tok):
    ids = tok.encode("a<turn|>é", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, skip_special_tokens=True)
    out = d.add(ids[:-1])                                     # é cut in half
    assert out == "a" and d.flush() == "\ufffd"


@pytest.mark.parametrize("fast", [True, False])
def test_detok_releases_a_run_of_invalid_bytes(tok, fast):
    from gemma4rt.frontend.textproc import MAX_HELD
    bad = tok.convert_tokens_to_ids("\u00c3")              # byte 0xC3 alone: never a complete character
    tail = tok.encode(" ok", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, skip_special_tokens=True)
    if not fast:
        d._stream = None
    pieces = [d.add([bad]) for _ in range(3 * MAX_HELD)] + [d.add([t]) for t in tail] + [d.flush()]
    assert all(p == "" for p in pieces[:MAX_HELD])           # held while it might still complete
    assert sum(1 for p in pieces[:3 * MAX_HELD] if p) >= 2   # then let out, not kept to the end
    assert "".join(pieces) == tok.decode([bad] * (3 * MAX_HELD) + tail)
    # the same ids in chunks of three (steps with several tokens: speculative decoding, a prompt echo)
    ids = [bad] * (3 * MAX_HELD) + tail
    d = IncrementalDetokenizer(tok, skip_special_tokens=True)
    if not fast:
        d._stream = None
    chunks = [d.add(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [d.flush()]
    assert sum(1 for p in chunks[:MAX_HELD] if p) >= 1 and "".join(chunks) == "".join(pieces)


def test_stop_strings_across_chunks():
    s = StopStrings(["STOP", "xyz"])
    assert s.feed("hello ST") == "hello "
    assert s.feed("O") == ""
    assert s.feed("P more") == "" and s.matched == "STOP"
    s = StopStrings(["STOP"], include_in_output=True)
    assert s.feed("aSTOPb") == "aSTOP"
    s = StopStrings(["ab"])
    assert s.feed("xa") == "x" and s.feed("c", final=True) == "ac" and s.matched is None
