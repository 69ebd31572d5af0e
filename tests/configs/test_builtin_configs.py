"""Built-in configs of the released models: transformers builds them (meta device) with the published sizes."""

import pytest
import torch

from gemma4rt.configs import KNOWN_MODELS, canonical_name, lookup_builtin_config

# computed totals of reference/gemma4-architecture.md §2.1 / §2.2 (billions of parameters)
EXPECTED_PARAMS = {
    "gemma-4-E2B-it": 5.104, "gemma-4-E4B-it": 7.941, "gemma-4-12B-it": 11.960, "gemma-4-31B-it": 31.273,
    "gemma-4-26B-A4B-it": 25.806,
    "gemma-4-E2B-it-assistant": 0.078, "gemma-4-E4B-it-assistant": 0.079, "gemma-4-12B-it-assistant": 0.423,
    "gemma-4-31B-it-assistant": 0.470, "gemma-4-26B-A4B-it-assistant": 0.420,
}
ARCH = {"gemma-4-12B-it": "Gemma4UnifiedForConditionalGeneration",
        "gemma-4-12B-it-assistant": "Gemma4UnifiedAssistantForCausalLM"}


def _build_on_meta(cfg_dict):
    import transformers
    from transformers import CONFIG_MAPPING

    from gemma4rt.tools.tiny_checkpoint import assistant_kv_sharing_workaround

    config = CONFIG_MAPPING[cfg_dict["model_type"]].from_dict(cfg_dict)
    cls = getattr(transformers, cfg_dict["architectures"][0])
    with assistant_kv_sharing_workaround(), torch.device("meta"):
        return cls(config)


def test_known_models_and_lookup():
    assert set(KNOWN_MODELS) == set(EXPECTED_PARAMS)
    for spelling in ("gemma-4-E4B-it", "google/gemma-4-E4B-it", "GOOGLE/GEMMA-4-e4b-IT", " gemma-4-e4b-it/ "):
        assert canonical_name(spelling) == "gemma-4-E4B-it"
        assert lookup_builtin_config(spelling)["text_config"]["hidden_size"] == 2560
    for unknown in ("gemma-4-E4B", "someone/gemma-4-E4B-it", "/models/gemma-4-E4B-it", "llama", ""):
        assert lookup_builtin_config(unknown) is None
    a = lookup_builtin_config("gemma-4-31B-it")
    a["text_config"]["hidden_size"] = 1
    assert lookup_builtin_config("gemma-4-31B-it")["text_config"]["hidden_size"] == 5376  # fresh copies


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_builds_on_meta_with_published_size(name):
    cfg = lookup_builtin_config(name)
    assert cfg["architectures"] == [ARCH.get(name, "Gemma4AssistantForCausalLM" if "assistant" in name
                                             else "Gemma4ForConditionalGeneration")]
    model = _build_on_meta(cfg)
    total = sum(p.numel() for p in model.parameters()) / 1e9
    # within 0.5%, or within the rounding of the 3-decimal published figure (drafters: 0.0785 -> "0.079")
    expected = EXPECTED_PARAMS[name]
    assert abs(total - expected) <= max(0.005 * expected, 0.0005), total


@pytest.mark.parametrize("name", [n for n in EXPECTED_PARAMS if not n.endswith("assistant")])
def test_target_fields(name):
    cfg = lookup_builtin_config(name)
    text = cfg["text_config"]
    assert cfg["eos_token_id"] == [1, 106]
    assert (text["pad_token_id"], text["eos_token_id"], text["bos_token_id"], text["vocab_size"]) == (0, 1, 2, 262144)
    assert (cfg["boi_token_id"], cfg["eoi_token_id"], cfg["image_token_id"], cfg["video_token_id"]) == (
        255999, 258882, 258880, 258884)
    assert (cfg["boa_token_id"], cfg["eoa_token_index"], cfg["audio_token_id"]) == (256000, 258883, 258881)
    assert text["layer_types"][-1] == "full_attention" and text["num_hidden_layers"] == len(text["layer_types"])
    assert text["global_head_dim"] == 512 and text["head_dim"] == 256 and "per_layer_config" not in text
    assert text["final_logit_softcapping"] == 30.0
    assert (cfg["audio_config"] is None) == (name in ("gemma-4-31B-it", "gemma-4-26B-A4B-it"))


def test_kv_geometry_of_drafters_matches_targets():
    from transformers import CONFIG_MAPPING

    for name in [n for n in EXPECTED_PARAMS if not n.endswith("assistant")]:
        target, drafter = lookup_builtin_config(name), lookup_builtin_config(name + "-assistant")
        assert drafter["backbone_hidden_size"] == target["text_config"]["hidden_size"]
        t = CONFIG_MAPPING[target["text_config"]["model_type"]].from_dict(target["text_config"])
        d = CONFIG_MAPPING[drafter["text_config"]["model_type"]].from_dict(drafter["text_config"])
        for kind in ("sliding_attention", "full_attention"):
            tl, dl = t.layer_types.index(kind), d.layer_types.index(kind)
            assert t.per_layer_config[tl].head_dim == d.per_layer_config[dl].head_dim, (name, kind)
            assert t.per_layer_config[tl].num_key_value_heads == d.per_layer_config[dl].num_key_value_heads, (name, kind)
        assert d.sliding_window == t.sliding_window


def test_kv_sharing_producers():
    from transformers import CONFIG_MAPPING

    for name, store in (("gemma-4-E2B-it", [13, 14]), ("gemma-4-E4B-it", [22, 23])):
        t = lookup_builtin_config(name)["text_config"]
        modes = CONFIG_MAPPING["gemma4_text"].from_dict(t).kv_sharing_modes
        assert [i for i, m in enumerate(modes) if m == "store"] == store
        assert modes.count("reuse") == t["num_kv_shared_layers"]
