"""Gemma 4 model geometry, parsed from a checkpoint's config.json in either on-disk dialect.

* Hub files (transformers ~5.5–5.10): top-level `global_head_dim` (full-layer head dim, default 512)
  and `num_global_key_value_heads` (full-layer KV heads, only when `attention_k_eq_v`).
* transformers 5.23 files: a sparse `per_layer_config` {layer index: {attr: value}} (always written,
  possibly empty); no `global_head_dim`.

Architectures: Gemma4ForConditionalGeneration, Gemma4ForCausalLM, Gemma4UnifiedForConditionalGeneration,
Gemma4UnifiedForCausalLM, Gemma4AssistantForCausalLM, Gemma4UnifiedAssistantForCausalLM.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str = "default"          # default | proportional
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class LayerSpec:
    index: int
    layer_type: str                     # SLIDING | FULL
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool                        # full layer without v_proj: V = vnorm(raw K projection)
    kv_shared: bool                     # reads another layer's cache, owns none
    kv_source: int                      # layer whose K/V this layer attends to (itself if not shared)
    intermediate_size: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    rms_norm_eps: float
    sliding_window: int
    final_logit_softcapping: Optional[float]
    hidden_size_per_layer_input: int
    vocab_size_per_layer_input: int
    num_kv_shared_layers: int
    enable_moe_block: bool
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    use_bidirectional_attention: Optional[str]
    max_position_embeddings: int
    rope: dict[str, RopeSpec]
    layers: tuple[LayerSpec, ...]
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1
    tie_word_embeddings: bool = True

    @property
    def has_ple(self) -> bool:
        return self.hidden_size_per_layer_input > 0

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    def geometry(self, layer_type: str) -> tuple[int, int]:
        """(num_kv_heads, head_dim) of the cache-owning layers of a type."""
        for l in self.layers:
            if l.layer_type == layer_type and not l.kv_shared:
                return l.num_kv_heads, l.head_dim
        for l in self.layers:
            if l.layer_type == layer_type:
                return l.num_kv_heads, l.head_dim
        raise ConfigError(f"no {layer_type} layer")

    def cache_layers(self, layer_type: str) -> list[int]:
        """Indices of the layers of this type that own KV cache, in order."""
        return [l.index for l in self.layers if l.layer_type == layer_type and not l.kv_shared]


@dataclass(frozen=True)
class AssistantSpec:
    backbone_hidden_size: int
    use_ordered_embeddings: bool
    num_centroids: int
    centroid_intermediate_top_k: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    text: TextConfig
    vision: Optional[dict] = None
    audio: Optional[dict] = None
    eos_token_ids: tuple[int, ...] = (1,)
    image_token_id: Optional[int] = None
    audio_token_id: Optional[int] = None
    video_token_id: Optional[int] = None
    boi_token_id: Optional[int] = None
    eoi_token_id: Optional[int] = None
    boa_token_id: Optional[int] = None
    eoa_token_id: Optional[int] = None
    assistant: Optional[AssistantSpec] = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_unified(self) -> bool:
        return self.model_type.startswith("gemma4_unified")

    @property
    def is_assistant(self) -> bool:
        return self.assistant is not None

    @property
    def is_multimodal_checkpoint(self) -> bool:
        """Weights live under model.language_model.* (the ForConditionalGeneration layout)."""
        return "ConditionalGeneration" in self.architecture

    def embed_scale(self, dtype) -> float:
        """sqrt(d) rounded to the weight dtype (bf16: 1536→39.25, 2560→50.5, …)."""
        import torch
        return float(torch.tensor(math.sqrt(self.text.hidden_size), dtype=dtype))


def _rope_specs(rp: Optional[dict], legacy: dict) -> dict[str, RopeSpec]:
    out = {
        SLIDING: RopeSpec("default", 10000.0, 1.0),
        FULL: RopeSpec("proportional", 1e6, 0.25),
    }
    if rp:
        for lt in (SLIDING, FULL):
            d = rp.get(lt)
            if d:
                out[lt] = RopeSpec(d.get("rope_type", "default"), float(d.get("rope_theta", out[lt].theta)),
                                   float(d.get("partial_rotary_factor", 1.0)), float(d.get("factor", 1.0) or 1.0))
    elif "rope_theta" in legacy:
        out[SLIDING] = RopeSpec("default", float(legacy.get("rope_local_base_freq", 10000.0)))
        out[FULL] = RopeSpec("proportional", float(legacy["rope_theta"]), 0.25)
    return out


def parse_text_config(tc: dict) -> TextConfig:
    L = int(tc.get("num_hidden_layers", 30))
    layer_types = list(tc.get("layer_types") or [])
    if not layer_types:
        layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(L)]
    if len(layer_types) != L:
        raise ConfigError(f"layer_types has {len(layer_types)} entries for {L} layers")
    if layer_types[-1] != FULL:  # transformers forces the last layer to full attention
        layer_types[-1] = FULL
    head_dim = int(tc.get("head_dim") or 256)
    kv_heads = int(tc.get("num_key_value_heads") or 4)
    k_eq_v = bool(tc.get("attention_k_eq_v", False))
    overrides: dict[int, dict] = {i: {} for i in range(L)}
    if "per_layer_config" in tc:
        for key, ov in (tc.get("per_layer_config") or {}).items():
            if key in (SLIDING, FULL):
                for i, t in enumerate(layer_types):
                    if t == key:
                        overrides[i].update(ov)
            else:
                overrides[int(key)].update(ov)
    else:
        g_hd = tc.get("global_head_dim")
        g_kv = tc.get("num_global_key_value_heads")
        for i, t in enumerate(layer_types):
            if t == FULL:
                overrides[i]["head_dim"] = int(g_hd) if g_hd is not None else 512
                if k_eq_v and g_kv is not None:
                    overrides[i]["num_key_value_heads"] = int(g_kv)
    n_shared = int(tc.get("num_kv_shared_layers") or 0)
    first_shared = L - n_shared
    inter = int(tc.get("intermediate_size", 9216))
    double = bool(tc.get("use_double_wide_mlp", False))
    # the producer of each type: last non-shared layer of that type
    producer = {}
    for i in range(first_shared):
        producer[layer_types[i]] = i
    layers = []
    for i, t in enumerate(layer_types):
        hd = int(overrides[i].get("head_dim", head_dim))
        kvh = int(overrides[i].get("num_key_value_heads", kv_heads))
        shared = i >= first_shared
        if shared and t not in producer:
            if first_shared == 0:   # drafter: every layer reads the target's cache
                src = -1
            else:
                raise ConfigError(f"layer {i} ({t}) is KV-shared but no earlier layer of that type owns a cache")
        else:
            src = producer[t] if shared else i
        layers.append(LayerSpec(
            index=i, layer_type=t, head_dim=hd, num_kv_heads=kvh, k_eq_v=k_eq_v and t == FULL,
            kv_shared=shared, kv_source=src,
            intermediate_size=inter * (2 if (double and shared) else 1)))
    softcap = tc.get("final_logit_softcapping")
    eos = tc.get("eos_token_id", 1)
    if isinstance(eos, list):
        eos = eos[0]
    P = int(tc.get("hidden_size_per_layer_input") or 0)
    return TextConfig(
        hidden_size=int(tc.get("hidden_size", 2304)),
        intermediate_size=inter,
        num_layers=L,
        num_heads=int(tc.get("num_attention_heads", 8)),
        vocab_size=int(tc.get("vocab_size", 262144)),
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
        sliding_window=int(tc.get("sliding_window") or 512),
        final_logit_softcapping=float(softcap) if softcap else None,
        hidden_size_per_layer_input=P,
        vocab_size_per_layer_input=int(tc.get("vocab_size_per_layer_input") or 0) if P else 0,
        num_kv_shared_layers=n_shared,
        enable_moe_block=bool(tc.get("enable_moe_block", False)),
        num_experts=int(tc.get("num_experts") or 0),
        top_k_experts=int(tc.get("top_k_experts") or 0),
        moe_intermediate_size=int(tc.get("moe_intermediate_size") or tc.get("expert_intermediate_size") or 0),
        use_bidirectional_attention=tc.get("use_bidirectional_attention"),
        max_position_embeddings=int(tc.get("max_position_embeddings", 131072)),
        rope=_rope_specs(tc.get("rope_parameters"), tc),
        layers=tuple(layers),
        pad_token_id=int(tc.get("pad_token_id", 0) if tc.get("pad_token_id") is not None else 0),
        bos_token_id=int(tc.get("bos_token_id", 2) if tc.get("bos_token_id") is not None else 2),
        eos_token_id=int(eos if eos is not None else 1),
        tie_word_embeddings=bool(tc.get("tie_word_embeddings", True)),
    )


def _as_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def parse_model_config(cfg: dict, generation_config: Optional[dict] = None) -> ModelConfig:
    """Build a ModelConfig from a config.json dict (and generation_config.json, for EOS ids)."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    arch = archs[0] if archs else {
        "gemma4": "Gemma4ForConditionalGeneration", "gemma4_text": "Gemma4ForCausalLM",
        "gemma4_unified": "Gemma4UnifiedForConditionalGeneration",
        "gemma4_unified_text": "Gemma4UnifiedForCausalLM",
        "gemma4_assistant": "Gemma4AssistantForCausalLM",
        "gemma4_unified_assistant": "Gemma4UnifiedAssistantForCausalLM",
    }.get(model_type, "")
    if not model_type.startswith("gemma4"):
        raise ConfigError(f"not a Gemma 4 checkpoint: model_type={model_type!r}, architectures={archs}")
    assistant = None
    if "text_config" in cfg:
        tc = dict(cfg["text_config"])
    else:
        tc = dict(cfg)
    if "assistant" in model_type:
        n = int(tc.get("num_hidden_layers", 4))
        if not tc.get("num_kv_shared_layers"):
            tc["num_kv_shared_layers"] = n
        assistant = AssistantSpec(
            backbone_hidden_size=int(cfg.get("backbone_hidden_size", 1536)),
            use_ordered_embeddings=bool(cfg.get("use_ordered_embeddings", False)),
            num_centroids=int(cfg.get("num_centroids", 2048)),
            centroid_intermediate_top_k=int(cfg.get("centroid_intermediate_top_k", 32)),
        )
    if "tie_word_embeddings" in cfg and "tie_word_embeddings" not in tc:
        tc["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    text = parse_text_config(tc)
    eos = _as_list((generation_config or {}).get("eos_token_id")) or _as_list(cfg.get("eos_token_id")) \
        or _as_list(tc.get("eos_token_id")) or [1]
    eoa = cfg.get("eoa_token_id", cfg.get("eoa_token_index"))
    return ModelConfig(
        architecture=arch, model_type=model_type, text=text,
        vision=cfg.get("vision_config"), audio=cfg.get("audio_config"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        image_token_id=cfg.get("image_token_id"), audio_token_id=cfg.get("audio_token_id"),
        video_token_id=cfg.get("video_token_id"), boi_token_id=cfg.get("boi_token_id"),
        eoi_token_id=cfg.get("eoi_token_id"), boa_token_id=cfg.get("boa_token_id"),
        eoa_token_id=eoa, assistant=assistant, raw=cfg)


def load_model_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{model_dir} has no config.json")
    with open(path) as f:
        cfg = json.load(f)
    gen = None
    gpath = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gpath):
        with open(gpath) as f:
            gen = json.load(f)
    return parse_model_config(cfg, gen)
