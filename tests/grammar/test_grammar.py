import json
import random
import re

import pytest
import torch

from gemma4rt.parsers import parse_tool_calls
from gemma4rt.protocol import GrammarSpec
from gemma4rt.worker.grammar import (
    GrammarBackend,
    GrammarError,
    apply_bitmask,
    tool_call_ebnf,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|tool_call>", "<tool_call|>", '<|"|>', "<|channel>",
            "<channel|>", "<turn|>"]
EXTRA_IDS = 37          # model vocab larger than the tokenizer's


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    corpus = [
        '{"name": "Paris", "age": 42, "ok": true, "tags": ["a", "b"], "x": null}',
        "get_weather location city unit celsius fahrenheit call: true false null 3.14 -7",
        "The quick brown fox jumps over the lazy dog. 0123456789 {}[],:\"'\\",
    ] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>",
                                   bos_token="<bos>")


@pytest.fixture(scope="module")
def backend(tok):
    stops = [tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<turn|>")]
    return GrammarBackend(tok, vocab_size=len(tok) + EXTRA_IDS, stop_token_ids=stops)


def _walk(backend, tok, spec, seed, max_tokens=200, greedy=False):
    """Sample tokens under the mask with random logits; return (text, terminated, ids)."""
    g = torch.Generator().manual_seed(seed)
    m = backend.matcher(spec)
    bitmask = backend.allocate_bitmask(2)
    ids = []
    for _ in range(max_tokens):
        if m.is_terminated():
            break
        m.fill_bitmask(bitmask, 1)
        logits = torch.randn(2, backend.vocab_size, generator=g)
        apply_bitmask(logits, bitmask, [1])
        assert torch.isfinite(logits[1]).any()
        if greedy:
            t = int(logits[1].argmax())
        else:
            t = int(torch.multinomial(torch.softmax(logits[1], -1), 1, generator=g))
        assert m.accept(t), t
        ids.append(t)
    text = tok.decode([i for i in ids if i not in backend.tokenizer_info.stop_token_ids],
                      skip_special_tokens=False)
    return text, m.is_terminated(), ids


def _validate(v, schema):
    """A tiny JSON-schema checker for the features used in these tests."""
    t = schema.get("type")
    if "enum" in schema:
        assert v in schema["enum"]
    if t == "object":
        assert isinstance(v, dict)
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            assert k in v
        for k, x in v.items():
            if k in props:
                _validate(x, props[k])
            else:
                assert schema.get("additionalProperties", True) is not False, k
    elif t == "array":
        assert isinstance(v, list)
        assert len(v) >= schema.get("minItems", 0)
        for x in v:
            _validate(x, schema.get("items", {}))
    elif t == "string":
        assert isinstance(v, str)
        if "pattern" in schema:
            assert re.fullmatch(schema["pattern"], v)
    elif t == "integer":
        assert isinstance(v, int) and not isinstance(v, bool)
        if "minimum" in schema:
            assert v >= schema["minimum"]
    elif t == "number":
        assert isinstance(v, (int, float)) and not isinstance(v, bool)
    elif t == "boolean":
        assert isinstance(v, bool)


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "[a-z]{1,8}"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "[a-c]{0,3}"},
                 "minItems": 1},
    },
    "required": ["city", "unit", "days", "tags"],
}


def test_validator_rejects_bad_values():
    with pytest.raises(AssertionError):
        _validate({"city": "x", "unit": "kelvin", "days": 1, "tags": ["a"]}, SCHEMA)
    with pytest.raises(AssertionError):
        _validate({"city": "x", "unit": "celsius", "days": 1, "tags": [], "e": 1}, SCHEMA)
    _validate({"city": "x", "unit": "celsius", "days": 1, "tags": ["a"]}, SCHEMA)


def test_json_schema_walks_validate(backend, tok):
    spec = GrammarSpec(kind="json_schema", value=json.dumps(SCHEMA))
    for seed in range(12):
        text, done, _ = _walk(backend, tok, spec, seed, max_tokens=400)
        assert done, text
        _validate(json.loads(text), SCHEMA)
        with pytest.raises(AssertionError):     # strict: no extra properties
            _validate({**json.loads(text), "zz": 1}, {**SCHEMA, "additionalProperties": False})


def test_json_object_walks_parse(backend, tok):
    spec = GrammarSpec(kind="json_object")
    n_done = 0
    for seed in range(10):
        text, done, _ = _walk(backend, tok, spec, seed, max_tokens=300, greedy=seed % 2 == 0)
        if done:
            n_done += 1
            assert isinstance(json.loads(text), dict)
    assert n_done >= 3


def test_regex_and_ebnf(backend, tok):
    for seed in range(8):
        text, done, _ = _walk(backend, tok, GrammarSpec(kind="regex", value=r"(yes|no)-[0-9]{2,4}"),
                              seed)
        assert done and re.fullmatch(r"(yes|no)-[0-9]{2,4}", text), text
        text, done, _ = _walk(backend, tok, GrammarSpec(
            kind="ebnf", value='root ::= "a" ("b" | "c")+ "d"'), seed)
        assert done and re.fullmatch(r"a[bc]+d", text), text


@pytest.mark.parametrize("kind,value", [
    ("json_schema", "{not json"),
    ("json_schema", '{"type": "object", "properties": {"a": {"type": "nosuchtype"}}}'),
    ("json_schema", "[1, 2]"),
    ("regex", "(unclosed"),
    ("ebnf", "root ::= undefined_rule"),
    ("tool_call", '{"tools": []}'),
    ("tool_call", '{"tools": [{"name": "bad name"}]}'),
    ("tool_call", "nope"),
    ("structural", "{}"),
])
def test_invalid_specs_raise(backend, kind, value):
    with pytest.raises(GrammarError):
        backend.compile(GrammarSpec(kind=kind, value=value))
    with pytest.raises(GrammarError):
        backend.compile_async(GrammarSpec(kind=kind, value=value)).result(timeout=60)


def test_cache_and_async(backend):
    spec = GrammarSpec(kind="regex", value="[ab]+c")
    a = backend.compile(spec)
    assert backend.compile(GrammarSpec(kind="regex", value="[ab]+c")) is a
    fut = backend.compile_async(GrammarSpec(kind="regex", value="x[0-9]"))
    assert fut.result(timeout=60) is backend.compile(GrammarSpec(kind="regex", value="x[0-9]"))


TOOLS = {"tools": [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"]}},
    {"name": "ping", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer"}, "xs": {"type": "array", "items": {"type": "boolean"}}}}},
], "parallel": False}


@pytest.mark.parametrize("parallel", [False, True])
def test_tool_call_grammar_parses_with_tool_parser(backend, tok, parallel):
    spec = GrammarSpec(kind="tool_call", value=json.dumps({**TOOLS, "parallel": parallel}))
    n_done = 0
    for seed in range(24):
        text, done, _ = _walk(backend, tok, spec, seed, max_tokens=300)
        # no control token can hide inside a string: every end tag closes a parsed call
        assert text.count("<tool_call|>") == len(parse_tool_calls(text)[1]), text
        if not done:
            continue
        n_done += 1
        content, calls = parse_tool_calls(text)
        assert content is None, text
        assert text.count("<tool_call|>") == len(calls) and text.endswith("<tool_call|>")
        assert len(calls) >= 1 and (parallel or len(calls) == 1)
        for c in calls:
            assert c.name in ("get_weather", "ping")
            args = json.loads(c.arguments)
            if c.name == "get_weather":
                assert set(args) <= {"city", "unit"} and isinstance(args["city"], str)
                assert args.get("unit", "c") in ("c", "f")
            else:
                assert set(args) <= {"n", "xs"}
                assert isinstance(args.get("n", 0), int)
                assert all(isinstance(x, bool) for x in args.get("xs", []))
    assert n_done >= 4


def test_tool_call_ebnf_text():
    g = tool_call_ebnf(TOOLS["tools"], parallel=False)
    assert '"get_weather"' in g and '"city"' in g and "root ::= call\n" in g
    # the required key (city, index 0) cannot be skipped: its rule has no alternative that goes on to the
    # next member without it; optional keys can be
    assert re.search(r'^a0_f0 ::= .*a0_f1', g, re.M) is None
    assert re.search(r'^a0_f1 ::= .*\(a0_f2\)', g, re.M) is not None
    assert re.search(r'^a1_f0 ::= .*\(a1_f1\)', g, re.M) is not None


def test_object_rules_grow_linearly():
    """Many optional properties (a fuzzed tool with 2000 of them froze the server for 37 s while its
    grammar was built): the grammar's size is linear in their number, and it still compiles."""
    def ebnf(n):
        props = {f"k{i}": {"type": "string"} for i in range(n)}
        return tool_call_ebnf([{"name": "f", "parameters": {"type": "object", "properties": props}}], parallel=False)
    small, big = len(ebnf(100)), len(ebnf(1000))
    assert big < 12 * small
    import xgrammar as xg
    xg.Grammar.from_ebnf(ebnf(2000))


def test_after_token_ids_and_rollback(backend, tok):
    end = tok.convert_tokens_to_ids("<channel|>")
    spec = GrammarSpec(kind="regex", value="[0-9]+", after_token_ids=[end])
    m = backend.matcher(spec)
    bm = backend.allocate_bitmask(1)
    a = tok.convert_tokens_to_ids("a")
    assert not m.fill_bitmask(bm, 0) and bool((bm == -1).all())   # unconstrained before
    assert m.accept(a) and not m.active
    assert m.accept(end) and m.active
    assert m.fill_bitmask(bm, 0)
    assert not m.accept(a)                                       # letters now forbidden
    d = tok.convert_tokens_to_ids("7")
    assert m.accept(d)
    m.rollback(2)                                                # undo "7" and the start token
    assert not m.active and m.accept(a)
    assert m.accept(end) and m.accept(d) and m.accept(d)
    eos = tok.convert_tokens_to_ids("<eos>")
    assert m.accept(eos) and m.is_terminated()


def test_extra_vocab_ids_disallowed(backend, tok):
    m = backend.matcher(GrammarSpec(kind="json_object"))
    bm = backend.allocate_bitmask(1)
    m.fill_bitmask(bm, 0)
    logits = torch.zeros(1, backend.vocab_size)
    apply_bitmask(logits, bm, [0])
    assert torch.isinf(logits[0, len(tok):]).all()
    assert torch.isfinite(logits[0, :len(tok)]).any()
    assert not m.accept(len(tok) + 3)


def test_apply_bitmask_matches_bits():
    rng = random.Random(0)
    V = 100
    bm = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32)
    logits = torch.randn(3, V)
    ref = logits.clone()
    apply_bitmask(logits, bm, [0, 2])
    for r in range(3):
        for t in rng.sample(range(V), 40):
            allowed = (int(bm[r, t // 32]) >> (t % 32)) & 1
            if r == 1 or allowed:
                assert logits[r, t] == ref[r, t]
            else:
                assert logits[r, t] == float("-inf")


def test_backend_from_vocab_list(tok):
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    eos = tok.convert_tokens_to_ids("<eos>")
    be = GrammarBackend(vocab, vocab_size=len(vocab) + 5, stop_token_ids=[eos])
    assert be.vocab_size == len(vocab) + 5
    for seed in range(4):
        text, done, _ = _walk(be, tok, GrammarSpec(kind="regex", value=r"call:[a-z]{1,5}!"), seed)
        assert done and re.fullmatch(r"call:[a-z]{1,5}!", text), text


def _allowed(backend, m) -> set:
    bm = backend.allocate_bitmask(1)
    m.fill_bitmask(bm, 0)
    logits = torch.zeros(1, backend.vocab_size)
    apply_bitmask(logits, bm, [0])
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def test_control_tokens_cannot_be_spelled(backend, tok):
    """Only the real `<|tool_call>` token opens a forced call, not '<', '|', ... spelled out; free-text
    grammars never emit an added token other than a stop token."""
    spec = GrammarSpec(kind="tool_call", value=json.dumps({**TOOLS, "parallel": False}))
    first = _allowed(backend, backend.matcher(spec))
    assert first == {tok.convert_tokens_to_ids("<|tool_call>")}
    free = _allowed(backend, backend.matcher(GrammarSpec(kind="regex", value=".{0,8}")))
    specials = {tok.convert_tokens_to_ids(t) for t in SPECIALS}
    stops = {tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<turn|>")}
    assert free & specials == stops and len(free) > 100


def test_control_tokens_in_the_base_vocab_get_symbols_too(tok):
    """A tokenizer that keeps `<|tool_call>` & co. in its base vocabulary (not as added tokens) still
    forces the real tokens."""
    class BaseVocabOnly:
        def __init__(self, t):
            self._t = t
            self.added_tokens_decoder = {}
            self.unk_token_id = t.unk_token_id

        def convert_tokens_to_ids(self, x):
            return self._t.convert_tokens_to_ids(x)

    b = GrammarBackend(tok, vocab_size=len(tok) + EXTRA_IDS,
                       stop_token_ids=[tok.convert_tokens_to_ids("<eos>")])
    b2 = GrammarBackend.__new__(GrammarBackend)
    b2.__dict__.update(b.__dict__)
    b2.symbols, b2.symbol_ids = {}, []
    import xgrammar as xg
    b2.tokenizer_info = xg.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok) + EXTRA_IDS,
                                                          stop_token_ids=[tok.convert_tokens_to_ids("<eos>")])
    b2._symbolize(BaseVocabOnly(tok))
    b2._compiler = xg.GrammarCompiler(b2.tokenizer_info)
    b2._cache = {}
    assert "<|tool_call>" in b2.symbols and '<|"|>' in b2.symbols
    spec = GrammarSpec(kind="tool_call", value=json.dumps({**TOOLS, "parallel": False}))
    assert _allowed(b2, b2.matcher(spec)) == {tok.convert_tokens_to_ids("<|tool_call>")}
