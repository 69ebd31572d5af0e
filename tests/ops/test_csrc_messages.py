"""The argument checks of the native ops (TORCH_CHECK in csrc/) build their messages from strings only.

On the GPU machine (torch 2.11, the extension built with -std=c++17 and with -std=c++20) a failed check whose
message streamed an integer killed the process with a segmentation fault instead of raising: a wrong-sized counter
for gemv_qkv_norm_rope_store (H200, 2026-11-30). The same checks with string-only messages raise a RuntimeError
there. So every argument after the condition must be a string literal, a `const char*` name, or a string
function (cudaGetErrorString, c10::toString). Pure text: runs everywhere."""
from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STRING_ARGS = re.compile(r"^(name|op|#\w+|cudaGetErrorString\(.*\)|c10::toString\(.*\))$")


def _skip_string(s: str, i: int) -> int:
    """Index just past the string literal starting at s[i] == '"'."""
    j = i + 1
    while s[j] != '"':
        j += 2 if s[j] == "\\" else 1
    return j + 1


def _check_args(src: str):
    """(line, [top-level arguments]) of each TORCH_CHECK( ... ) call in src."""
    for m in re.finditer(r"\bTORCH_CHECK\(", src):
        args, cur, depth, j = [], "", 1, m.end()
        while True:
            c = src[j]
            if c == '"':
                k = _skip_string(src, j)
                cur += src[j:k]
                j = k
                continue
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
                if depth == 0:
                    break
            if c == "," and depth == 1:
                args.append(cur.strip())
                cur = ""
            else:
                cur += c
            j += 1
        args.append(cur.strip())
        yield src[:m.start()].count("\n") + 1, args


def _non_string(arg: str) -> bool:
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', "", arg).strip()
    rest = re.sub(r"^\w+\s*\?\s*:\s*$", "", rest)       # cond ? "a" : "b" leaves "cond ? :"
    return bool(rest) and not STRING_ARGS.match(rest)


def test_check_messages_are_strings_only():
    bad = []
    files = glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True)
    assert any(f.endswith("torch_bindings.cpp") for f in files)
    n = 0
    for f in files:
        src = open(f, encoding="utf-8").read()
        for line, args in _check_args(src):
            n += 1
            bad += [f"{os.path.relpath(f, ROOT)}:{line}: {a}" for a in args[1:] if _non_string(a)]
    assert n > 50                                  # the scan found the checks
    assert not bad, "TORCH_CHECK messages with non-string arguments:\n" + "\n".join(bad)


def test_the_scan_flags_a_number():
    src = 'void f(int64_t n) { TORCH_CHECK(n > 0, "need ", n, " slots"); TORCH_CHECK(n, name, ": ok"); }'
    found = [(line, a) for line, args in _check_args(src) for a in args[1:] if _non_string(a)]
    assert found == [(1, "n")]
