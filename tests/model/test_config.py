"""Config parsing: both on-disk dialects and every architecture."""
import json
import os

import pytest

from gemma4rt.model_config import FULL, SLIDING, ConfigError, parse_model_config

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "configs")


def _load(name):
    with open(os.path.join(DATA, f"config_{name}.json")) as f:
        return json.load(f)


def test_hub_dialect_global_head_dim_and_kv_heads():
    cfg = parse_model_config(_load("hub_dialect"))
    t = cfg.text
    assert [l.layer_type for l in t.layers] == [SLIDING] * 4 + [FULL]
    assert [(l.head_dim, l.num_kv_heads, l.k_eq_v) for l in t.layers] == [(16, 2, False)] * 4 + [(32, 1, True)]
    assert cfg.eos_token_ids == (1, 106)
    assert cfg.eoa_token_id == 258883 and cfg.image_token_id == 258880
    assert t.sliding_window == 8 and t.final_logit_softcapping == 30.0


def test_hub_dialect_kv_override_needs_k_eq_v():
    raw = _load("hub_dialect")
    raw["text_config"]["attention_k_eq_v"] = False
    t = parse_model_config(raw).text
    assert (t.layers[4].head_dim, t.layers[4].num_kv_heads, t.layers[4].k_eq_v) == (32, 2, False)
    del raw["text_config"]["global_head_dim"]
    assert parse_model_config(raw).text.layers[4].head_dim == 512      # the documented default


def test_per_layer_config_dialect_and_kv_sharing():
    cfg = parse_model_config(_load("eseries"))
    t = cfg.text
    assert [l.head_dim for l in t.layers] == [16, 16, 32, 16, 32, 16, 32]
    assert [l.kv_shared for l in t.layers] == [False] * 4 + [True] * 3
    # consumers read the last non-shared layer of their own type: full → 2, sliding → 3
    assert [l.kv_source for l in t.layers] == [0, 1, 2, 3, 2, 3, 2]
    assert [l.intermediate_size for l in t.layers] == [128] * 4 + [256] * 3     # double-wide
    assert t.hidden_size_per_layer_input == 8 and t.has_ple
    assert t.cache_layers(SLIDING) == [0, 1, 3] and t.cache_layers(FULL) == [2]


@pytest.mark.parametrize("name,arch", [("large", "Gemma4ForConditionalGeneration"),
                                       ("moe", "Gemma4ForConditionalGeneration"),
                                       ("unified", "Gemma4UnifiedForConditionalGeneration"),
                                       ("assistant", "Gemma4AssistantForCausalLM")])
def test_architectures(name, arch):
    cfg = parse_model_config(_load(name))
    assert cfg.architecture == arch
    t = cfg.text
    if name in ("large", "moe", "unified"):
        full = [l for l in t.layers if l.layer_type == FULL]
        assert all(l.k_eq_v and l.num_kv_heads == 1 and l.head_dim == 32 for l in full)
        assert t.use_bidirectional_attention == "vision"
    if name == "moe":
        assert (t.num_experts, t.top_k_experts, t.moe_intermediate_size) == (8, 2, 24)
    if name == "unified":
        assert cfg.is_unified
    if name == "assistant":
        assert cfg.is_assistant and all(l.kv_shared for l in t.layers)
        assert cfg.assistant.use_ordered_embeddings and cfg.assistant.num_centroids == 16


def test_transformers_agrees_on_geometry():
    """The 5.23 per-layer view of transformers gives the same head dims / KV heads as ours."""
    from transformers import AutoConfig
    import tempfile
    for name in ("eseries", "large", "hub_dialect"):
        raw = _load(name)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(raw, f)
            hf = AutoConfig.from_pretrained(d).text_config
        ours = parse_model_config(raw).text
        for i, l in enumerate(ours.layers):
            plc = hf.per_layer_config[i]
            assert (l.head_dim, l.num_kv_heads) == (plc.head_dim, plc.num_key_value_heads), (name, i)


def test_not_gemma4_is_rejected():
    with pytest.raises(ConfigError, match="not a Gemma 4"):
        parse_model_config({"model_type": "llama"})
