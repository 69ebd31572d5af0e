"""Tiny random checkpoints: written with transformers' classes, reload to identical weights and logits."""

import json
import os
from pathlib import Path

import pytest
import torch

from gemma4rt.tools import tiny_checkpoint as tc

REFERENCE = Path("/work/shared/reference/tiny-configs")
REFERENCE_FILES = {"e": "config_eseries.json", "dense": "config_large.json", "moe": "config_moe.json",
                   "unified": "config_unified.json", "assistant": "config_assistant.json"}
CLASSES = {"e": "Gemma4ForConditionalGeneration", "dense": "Gemma4ForConditionalGeneration",
           "moe": "Gemma4ForConditionalGeneration", "unified": "Gemma4UnifiedForConditionalGeneration",
           "assistant": "Gemma4AssistantForCausalLM"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: tc.write_tiny_checkpoint(root / fam, fam, seed=7) for fam in tc.FAMILIES}


def _assistant_inputs():
    g = torch.Generator().manual_seed(3)
    t = 6
    kv = {"sliding_attention": (torch.randn(1, 1, t, 16, generator=g), torch.randn(1, 1, t, 16, generator=g)),
          "full_attention": (torch.randn(1, 1, t, 32, generator=g), torch.randn(1, 1, t, 32, generator=g))}
    return {"inputs_embeds": torch.randn(1, 1, 128, generator=g), "shared_kv_states": kv,
            "position_ids": torch.tensor([[t]])}


def _logits(model, family, text_only=False):
    with torch.no_grad():
        if family == "assistant":
            return model(**_assistant_inputs()).logits
        return model(**tc.sample_inputs(family, text_only=text_only), use_cache=False).logits


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", tc.FAMILIES)
def test_reload_gives_identical_weights_and_logits(written, family):
    path = written[family]
    expected = tc.build_tiny_model(family, seed=7)
    ref_logits = _logits(expected, family)
    assert torch.isfinite(ref_logits).all() and ref_logits.std() > 0.5  # logits of a few units
    auto = tc.load_tiny_model(path)  # AutoModelForCausalLM
    named = tc.load_tiny_model(path, family=family)
    for model in (auto, named):
        assert type(model).__name__ == CLASSES[family]
        _assert_same_weights(expected, model)
        # the weights are bit-identical; the logits agree to fp32 rounding only: a reloaded model's tensors
        # can differ in memory layout or alignment, which changes the CPU kernels' summation order (seen with
        # transformers 5.24 on an AMD EPYC: 5e-6 on logits of ~14 for moe, 3e-6 for the assistant)
        torch.testing.assert_close(_logits(model, family), ref_logits, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("family", tc.FAMILIES)
def test_checkpoint_files(written, family):
    from transformers import AutoTokenizer, GenerationConfig

    path = written[family]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (path / name).is_file(), name
    gen = GenerationConfig.from_pretrained(path)
    assert list(gen.eos_token_id) == [1, 106, 50]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["text_config"]["eos_token_id"] == 1 and cfg["architectures"] == [CLASSES[family]]
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == cfg["text_config"]["vocab_size"] == 512
    assert [tok.convert_ids_to_tokens(i) for i in gen.eos_token_id] == ["<eos>", "<turn|>", "<|tool_response>"]
    assert "<|turn>model" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                     add_generation_prompt=True)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference tiny-configs not available")
@pytest.mark.parametrize("family", tc.FAMILIES)
def test_config_equals_reference_json(written, family):
    saved = json.loads((written[family] / "config.json").read_text())
    want = json.loads((REFERENCE / REFERENCE_FILES[family]).read_text())
    saved.pop("transformers_version")
    want.pop("transformers_version")
    assert saved == want
    keys = json.loads((REFERENCE / REFERENCE_FILES[family].replace("config", "keys")).read_text())
    from safetensors import safe_open

    with safe_open(written[family] / "model.safetensors", "pt") as f:
        got = sorted([k, list(f.get_slice(k).get_shape())] for k in f.keys())
    assert got == sorted(keys)


@pytest.mark.parametrize("family", tc.FAMILIES)
def test_no_constant_tensors_left(written, family):
    from safetensors.torch import load_file

    tensors = load_file(written[family] / "model.safetensors")
    for name, t in tensors.items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name
        if t.numel() > 1:
            assert not bool((t == t.flatten()[0]).all()), f"{name} is constant"
    if family == "assistant":
        order = tensors["masked_embedding.token_ordering"]
        assert sorted(order.tolist()) == list(range(512)) and order.tolist() != list(range(512))


def test_clip_bounds_finite_and_mostly_inactive():
    model = tc.build_tiny_model("e", seed=1)
    clipped = [m for m in model.modules() if type(m).__name__ == "Gemma4ClippableLinear" and m.use_clipped_linears]
    assert len(clipped) == 2 * 7 + 2 * 10  # 2 vision layers x 7 linears, 2 conformer blocks x 10
    fractions = []

    def hook(mod, args, out):
        x = args[0]
        y = mod.linear(x.clamp(mod.input_min, mod.input_max))
        fractions.append(((x < mod.input_min) | (x > mod.input_max)).float().mean().item())
        fractions.append(((y < mod.output_min) | (y > mod.output_max)).float().mean().item())

    for m in clipped:
        assert float(m.input_min) < float(m.input_max) and float(m.output_min) < float(m.output_max)
        m.register_forward_hook(hook)
    ref = _logits(model, "e")
    assert len(fractions) == 2 * len(clipped)
    assert max(fractions) <= 0.05 and sum(fractions) / len(fractions) <= 0.02 and sum(fractions) > 0
    for m in clipped:
        for attr in ("input_min", "output_min"):
            getattr(m, attr).fill_(-float("inf"))
        for attr in ("input_max", "output_max"):
            getattr(m, attr).fill_(float("inf"))
    assert (_logits(model, "e") - ref).abs().max() > 1e-4  # a loader that ignores the bounds is caught


def test_randomised_values_change_logits():
    """Norm weights / layer_scalar are not 1: resetting them to HF's constants changes the logits."""
    model = tc.build_tiny_model("moe", seed=2)
    ref = _logits(model, "moe")
    for name in ("layer_scalar", "router.per_expert_scale", "norm.weight"):
        m2 = tc.build_tiny_model("moe", seed=2)
        with torch.no_grad():
            for n, t in m2.state_dict(keep_vars=True).items():
                if n.endswith(name):
                    t.data.fill_(1.0)
        assert (_logits(m2, "moe") - ref).abs().max() > 1e-3, name


def test_seed_and_determinism():
    a, b, c = (tc.build_tiny_model("dense", seed=s) for s in (5, 5, 6))
    _assert_same_weights(a, b)
    assert not torch.equal(a.state_dict()["model.language_model.norm.weight"],
                           c.state_dict()["model.language_model.norm.weight"])


def test_text_only_and_bf16_via_cli(tmp_path):
    from safetensors import safe_open

    tc.main([str(tmp_path / "t"), "--family", "e", "--text-only", "--dtype", "bfloat16", "--seed", "3"])
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4ForCausalLM"] and cfg["model_type"] == "gemma4_text"
    assert cfg["dtype"] == "bfloat16"
    with safe_open(tmp_path / "t" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("model.") and not k.startswith("model.language_model") for k in keys)
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    model = tc.load_tiny_model(tmp_path / "t")
    assert type(model).__name__ == "Gemma4ForCausalLM"
    _assert_same_weights(tc.build_tiny_model("e", seed=3, dtype=torch.bfloat16, text_only=True), model)
    with pytest.raises(ValueError):
        tc.build_config("assistant", text_only=True)


def test_workaround_is_scoped():
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    before = Gemma4TextConfig.kv_sharing_modes
    cfg = tc.build_config("assistant").text_config
    with tc.assistant_kv_sharing_workaround():
        assert cfg.kv_sharing_modes == ["reuse"] * 4
        assert tc.build_config("e").text_config.kv_sharing_modes == [None, None, "store", "store", "reuse", "reuse", "reuse"]
    assert Gemma4TextConfig.kv_sharing_modes is before


def test_demo_checkpoint_created_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4RT_CACHE", str(tmp_path / "cache"))
    first = tc.demo_checkpoint_path()
    assert first == tmp_path / "cache" / f"demo-{tc.DEMO_VERSION}"
    assert (first / "model.safetensors").is_file() and (first / "chat_template.jinja").is_file()
    mtime = os.stat(first / "model.safetensors").st_mtime_ns

    def must_not_write(*a, **k):
        raise AssertionError("demo checkpoint rewritten")

    monkeypatch.setattr(tc, "write_tiny_checkpoint", must_not_write)
    assert tc.demo_checkpoint_path() == first
    assert os.stat(first / "model.safetensors").st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]  # no temp dirs left
    assert type(tc.load_tiny_model(first)).__name__ == "Gemma4ForConditionalGeneration"
