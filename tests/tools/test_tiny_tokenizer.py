"""The tiny Gemma 4 tokenizer: 512 entries, fixed special ids, byte-level round trips, atomic specials."""

import json
import random

import pytest

from gemma4rt.tools.tiny_tokenizer import (
    GENERATION_EOS_IDS,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_backend_tokenizer,
    save_tiny_tokenizer,
)

EXPECTED_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
    "<|tool>": 46, "<tool|>": 47, "<|tool_call>": 48, "<tool_call|>": 49,
    "<|tool_response>": 50, "<tool_response|>": 51, '<|"|>': 52, "<|think|>": 98,
    "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106,
    "<|image>": 500, "<image|>": 501, "<|image|>": 502, "<|video|>": 503,
    "<|audio>": 504, "<audio|>": 505, "<|audio|>": 506,
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(path)


def test_size_and_special_ids(tok):
    assert len(tok) == VOCAB_SIZE == 512
    assert {text: tok.convert_tokens_to_ids(text) for text in EXPECTED_IDS} == EXPECTED_IDS
    assert {v: k for k, v in SPECIAL_TOKENS.items()} == EXPECTED_IDS
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert GENERATION_EOS_IDS == [1, 106, 50]
    # every id decodes to something and maps back to itself (no holes in the vocab)
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(512))


def test_no_bos_added_and_config(tok, tmp_path):
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=True)
    assert 2 not in tok.encode("hello world")
    cfg = json.loads((save_tiny_tokenizer(tmp_path) / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert (tmp_path / "chat_template.jinja").is_file()


def _random_text(rng: random.Random) -> str:
    pools = [
        (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x9FFF),
        (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF), (0x0, 0x1F),
    ]
    out = []
    for _ in range(rng.randint(0, 60)):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_random_unicode_round_trips(tok):
    rng = random.Random(1234)
    samples = [_random_text(rng) for _ in range(300)]
    samples += ["héllo 世界 🎉👍🏽 e\u0301", "\n\n\t  x  ", "", "👨‍👩‍👧‍👦", "def f(x):\n    return x ** 2\n"]
    for text in samples:
        ids = tok.encode(text)
        assert all(0 <= i < 512 for i in ids)
        assert tok.decode(ids) == text, repr(text)


def test_special_tokens_atomic_and_literal(tok):
    for text, i in EXPECTED_IDS.items():
        assert tok.encode(f"a{text}b") == tok.encode("a") + [i] + tok.encode("b"), text
    prompt = '<bos><|turn>user\nHi<turn|>\n<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|>'
    ids = tok.encode(prompt)
    assert ids[:2] == [2, 105] and 106 in ids and 52 in ids
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi\ncall:f{a:x}"


def test_common_words_are_single_tokens(tok):
    for word in ["The", " the", " weather", " model", " return", "def", " is", " and"]:
        assert len(tok.encode(word)) == 1, word
    assert len(tok.encode("The weather in Paris is sunny.")) <= 10


def test_deterministic_build():
    a = build_backend_tokenizer().to_str()
    b = build_backend_tokenizer().to_str()
    assert a == b
