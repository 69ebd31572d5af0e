"""Tiny random Gemma 4 checkpoints built with transformers' own classes (the test oracle, DESIGN.md §5).

    python -m gemma4rt.tools.tiny_checkpoint OUT --family e|dense|moe|unified|assistant
                                             [--seed N] [--dtype float32|bfloat16] [--text-only]

Families (field values of reference/tiny-configs/, copied here because /work/shared is not shipped):
  e          Gemma4ForConditionalGeneration, E2B/E4B style: PLE, KV sharing, double-wide MLP, vision + audio
  dense      Gemma4ForConditionalGeneration, 31B style: K=V full layers, bidirectional vision, large ViT
  moe        Gemma4ForConditionalGeneration, 26B-A4B style: dense + 8 experts top-2 in every layer
  unified    Gemma4UnifiedForConditionalGeneration, 12B style: encoder-free vision and audio
  assistant  Gemma4AssistantForCausalLM, the MTP drafter of the `e` target (centroid LM head)
`--text-only` writes Gemma4ForCausalLM (Gemma4UnifiedForCausalLM for unified) from the text config alone.

Every value HF initialises to a constant (norm weights, layer_scalar, router scales, std_bias/std_scale,
position tables, biases, per_dim_scale) is re-drawn from a seeded generator, the tied embedding is
re-drawn at std 0.3 (logits of a few units, so the soft-cap matters), the drafter's
token_ordering is a random permutation, and the clipped-linear bounds are set at the 0-1% / 99-100%
quantiles of the values seen on a sample image/audio input (finite, clipping only the extremes). The directory also gets
generation_config.json, the tiny tokenizer and chat_template.jinja.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from gemma4rt.tools.tiny_tokenizer import GENERATION_EOS_IDS, TOKEN_IDS, save_tiny_tokenizer

FAMILIES = ("e", "dense", "moe", "unified", "assistant")
DEMO_FAMILY = "e"
DEMO_VERSION = "2"
DEMO_SEED = 3            # a seed whose random model writes varied (meaningless) text, not one repeated token
_EMBED_STD = 0.3  # bump when the demo checkpoint's contents change

S, F = "sliding_attention", "full_attention"
_ROPE = {
    F: {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
    S: {"rope_theta": 10000.0, "rope_type": "default"},
}
_TEXT_COMMON = {
    "model_type": "gemma4_text", "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2,
    "eos_token_id": 1, "pad_token_id": 0, "final_logit_softcapping": 30.0, "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 64, "initializer_range": 0.02,
    "max_position_embeddings": 256, "num_attention_heads": 4, "rms_norm_eps": 1e-06, "rope_parameters": _ROPE,
    "sliding_window": 4, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 512,
    "enable_moe_block": False, "moe_intermediate_size": None, "num_experts": None, "top_k_experts": None,
    "use_double_wide_mlp": False,
}
_TEXT = {
    "e": {
        **_TEXT_COMMON, "attention_k_eq_v": False, "hidden_size_per_layer_input": 8, "intermediate_size": 128,
        "layer_types": [S, S, F, S, F, S, F], "num_hidden_layers": 7, "num_key_value_heads": 1,
        "num_kv_shared_layers": 3, "per_layer_config": {"2": {"head_dim": 32}, "4": {"head_dim": 32}, "6": {"head_dim": 32}},
        "use_bidirectional_attention": None, "use_double_wide_mlp": True, "vocab_size_per_layer_input": 512,
    },
    "dense": {
        **_TEXT_COMMON, "attention_k_eq_v": True, "hidden_size_per_layer_input": 0, "intermediate_size": 96,
        "layer_types": [S, S, F, S, S, F], "num_hidden_layers": 6, "num_key_value_heads": 2,
        "num_kv_shared_layers": 0,
        "per_layer_config": {"2": {"head_dim": 32, "num_key_value_heads": 1}, "5": {"head_dim": 32, "num_key_value_heads": 1}},
        "use_bidirectional_attention": "vision", "vocab_size_per_layer_input": 512,
    },
}
_TEXT["moe"] = {**_TEXT["dense"], "enable_moe_block": True, "moe_intermediate_size": 24, "num_experts": 8, "top_k_experts": 2}
_TEXT["unified"] = {
    k: v for k, v in _TEXT["dense"].items()
    if k not in ("enable_moe_block", "moe_intermediate_size", "num_experts", "top_k_experts",
                 "hidden_size_per_layer_input", "vocab_size_per_layer_input")
}
_TEXT["unified"].update(model_type="gemma4_unified_text", intermediate_size=128)
_TEXT["assistant"] = {
    **_TEXT_COMMON, "attention_k_eq_v": False, "final_logit_softcapping": None, "hidden_size": 32,
    "hidden_size_per_layer_input": 0, "intermediate_size": 64, "layer_types": [S, S, S, F], "num_hidden_layers": 4,
    "num_key_value_heads": 1, "num_kv_shared_layers": 4, "per_layer_config": {"3": {"head_dim": 32}},
    "use_bidirectional_attention": None, "vocab_size_per_layer_input": 0,
}
_VISION_VIT = {
    "model_type": "gemma4_vision", "attention_bias": False, "attention_dropout": 0.0, "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "max_position_embeddings": 131072, "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "patch_size": 4, "pooling_kernel_size": 2, "position_embedding_size": 64, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"},
}
_AUDIO = {
    "model_type": "gemma4_audio", "attention_chunk_size": 4, "attention_context_left": 5, "attention_context_right": 0,
    "attention_invalid_logits_value": -1000000000.0, "attention_logit_cap": 50.0, "conv_kernel_size": 5,
    "gradient_clipping": 10000000000.0, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
    "num_attention_heads": 4, "num_hidden_layers": 2, "output_proj_dims": 24, "residual_weight": 0.5,
    "rms_norm_eps": 1e-06, "subsampling_conv_channels": [16, 4], "use_clipped_linears": True,
}
_MM_IDS = {
    "boi_token_id": TOKEN_IDS["<|image>"], "eoi_token_id": TOKEN_IDS["<image|>"], "image_token_id": TOKEN_IDS["<|image|>"],
    "video_token_id": TOKEN_IDS["<|video|>"], "boa_token_id": TOKEN_IDS["<|audio>"],
    "eoa_token_index": TOKEN_IDS["<audio|>"], "audio_token_id": TOKEN_IDS["<|audio|>"],
}
_TOP_COMMON = {"dtype": "float32", "initializer_range": 0.02, "tie_word_embeddings": True, **_MM_IDS}


def config_dict(family: str) -> dict:
    """The tiny config of `family` as a `config.json`-style dict (5.23 dialect, as in tiny-configs/)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    text = copy.deepcopy(_TEXT[family])
    if family == "e":
        vision = {**_VISION_VIT, "standardize": False, "use_clipped_linears": True}
        d = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", **_TOP_COMMON,
             "text_config": text, "vision_config": vision, "audio_config": dict(_AUDIO)}
    elif family in ("dense", "moe"):
        vision = {**_VISION_VIT, "standardize": True, "use_clipped_linears": False}
        d = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", **_TOP_COMMON,
             "text_config": text, "vision_config": vision, "audio_config": None}
    elif family == "unified":
        vision = {"model_type": "gemma4_unified_vision", "initializer_range": 0.02, "mm_embed_dim": 48,
                  "mm_posemb_size": 16, "output_proj_dims": 48, "patch_size": 2, "pooling_kernel_size": 2,
                  "rms_norm_eps": 1e-06}
        audio = {"model_type": "gemma4_unified_audio", "audio_embed_dim": 40, "initializer_range": 0.02,
                 "rms_norm_eps": 1e-06}
        d = {"architectures": ["Gemma4UnifiedForConditionalGeneration"], "model_type": "gemma4_unified",
             **_TOP_COMMON, "text_config": text, "vision_config": vision, "audio_config": audio}
    else:
        d = {"architectures": ["Gemma4AssistantForCausalLM"], "model_type": "gemma4_assistant", "dtype": "float32",
             "backbone_hidden_size": 64, "centroid_intermediate_top_k": 4, "num_centroids": 16,
             "tie_word_embeddings": True, "use_ordered_embeddings": True, "text_config": text}
    return d


@contextlib.contextmanager
def assistant_kv_sharing_workaround():
    """Let transformers 5.23 build a drafter (all layers KV-shared), gemma4-architecture.md §1.5.

    While active, `kv_sharing_modes` of the gemma4 / gemma4_unified text configs returns `["reuse"] * L`
    when every layer is shared (5.23 raises there); otherwise it defers to the original property.
    Patches the class only for the duration of the `with` block (not thread-safe; tests and tools only).
    """
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

    saved = []
    for cls in (Gemma4TextConfig, Gemma4UnifiedTextConfig):
        original = cls.__dict__.get("kv_sharing_modes")
        if not isinstance(original, property):
            continue

        def modes(self, _orig=original):
            if self.num_kv_shared_layers and self.num_kv_shared_layers >= self.num_hidden_layers:
                return ["reuse"] * self.num_hidden_layers
            return _orig.fget(self)

        saved.append((cls, original))
        cls.kv_sharing_modes = property(modes)
    try:
        yield
    finally:
        for cls, original in saved:
            cls.kv_sharing_modes = original


def build_config(family: str, text_only: bool = False):
    """A transformers config object for `family` (the text config alone when `text_only`)."""
    from transformers import CONFIG_MAPPING

    d = config_dict(family)
    if text_only:
        if family == "assistant":
            raise ValueError("--text-only does not apply to the assistant family")
        d = d["text_config"]
    d = copy.deepcopy(d)
    return CONFIG_MAPPING[d["model_type"]].from_dict(d)


def _model_class(family: str, text_only: bool):
    import transformers

    if family == "assistant":
        return transformers.Gemma4AssistantForCausalLM
    if family == "unified":
        return transformers.Gemma4UnifiedForCausalLM if text_only else transformers.Gemma4UnifiedForConditionalGeneration
    return transformers.Gemma4ForCausalLM if text_only else transformers.Gemma4ForConditionalGeneration


def sample_inputs(family: str, text_only: bool = False, seed: int = 0) -> dict:
    """Forward-pass kwargs for the tiny `e`/`dense`/`moe` models (tiny-configs/README.md "Inputs").

    `e`: 27 tokens with one image (6 soft tokens) and one audio clip (10 soft tokens); `dense`/`moe`: one
    image with `mm_token_type_ids`; `text_only` (or `unified`): text tokens only.
    """
    g = torch.Generator().manual_seed(seed)
    img, aud = TOKEN_IDS["<|image|>"], TOKEN_IDS["<|audio|>"]
    boi, eoi, boa, eoa = (TOKEN_IDS[t] for t in ("<|image>", "<image|>", "<|audio>", "<audio|>"))
    if text_only or family in ("unified", "assistant"):
        return {"input_ids": torch.tensor([[2, 10, 11, 12, 13, 300, 301, 302, 14, 15, 400, 401]])}
    # 4 x 6 patch grid, padded to 32 patches; 48 = 4*4*3 values per patch, in [0, 1]
    pixel_values = torch.rand(1, 32, 48, generator=g)
    pos = [[x, y] for y in range(6) for x in range(4)] + [[-1, -1]] * 8
    out = {"pixel_values": pixel_values, "image_position_ids": torch.tensor([pos])}
    if family == "e":
        ids = [2, 10, 11, boi] + [img] * 6 + [eoi, 12, boa] + [aud] * 10 + [eoa, 13, 14, 15]
        mask = torch.ones(1, 40, dtype=torch.bool)
        mask[:, 37:] = False
        out.update(input_features=torch.randn(1, 40, 16, generator=g), input_features_mask=mask)
    else:
        ids = [2, 10, 11, boi] + [img] * 6 + [eoi, 12, 13, 14, 15]
    input_ids = torch.tensor([ids])
    out["input_ids"] = input_ids
    out["mm_token_type_ids"] = (input_ids == img).long() + 3 * (input_ids == aud).long()
    return out


def _randomise_constants(model, g: torch.Generator) -> None:
    """Re-draw every saved tensor that HF initialised to a constant (see module docstring)."""
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or t.numel() == 0:
            continue
        seen.add(id(t))
        data = t.data
        if name.endswith("token_ordering"):
            data.copy_(torch.randperm(data.numel(), generator=g).view_as(data))
            continue
        if not data.is_floating_point():
            continue
        first = data.flatten()[0]
        if torch.isinf(first) or not bool((data == first).all()):
            continue  # random already, or a clip bound (calibrated later)
        if name.endswith("position_embedding_table"):
            new = torch.randn(data.shape, generator=g) * 0.1
        elif name.endswith("per_dim_scale"):
            new = torch.randn(data.shape, generator=g) * 0.5
        elif float(first) == 1.0:  # norm weights, layer_scalar, router scale/per_expert_scale, std_scale
            new = torch.rand(data.shape, generator=g) + 0.5
        else:  # zeros: biases, std_bias
            new = torch.randn(data.shape, generator=g) * 0.1
        data.copy_(new.to(data.dtype))


@torch.no_grad()
def _calibrate_clip_bounds(model, family: str, g: torch.Generator) -> None:
    """Set clipped-linear bounds at random quantiles in [0, 1%] / [99%, 100%] of the values seen on the
    sample input, so each bound clips at most ~1% of the elements there (finite, mostly inactive)."""
    clipped = [m for m in model.modules() if type(m).__name__ == "Gemma4ClippableLinear" and m.use_clipped_linears]
    if not clipped:
        return
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(mod, args, output):
        seen[id(mod)] = (args[0].detach().flatten().float(), output.detach().flatten().float())

    handles = [m.register_forward_hook(hook) for m in clipped]
    try:
        model(**sample_inputs(family), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for m in clipped:
        x_in, x_out = seen[id(m)]
        for attr, values, is_min in (("input_min", x_in, True), ("input_max", x_in, False),
                                     ("output_min", x_out, True), ("output_max", x_out, False)):
            q = 0.01 * float(torch.rand((), generator=g))
            getattr(m, attr).fill_(float(torch.quantile(values, q if is_min else 1.0 - q)))


def build_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, text_only: bool = False):
    """The in-memory tiny model (eval mode), exactly as `write_tiny_checkpoint` saves it."""
    config = build_config(family, text_only)
    cls = _model_class(family, text_only)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with assistant_kv_sharing_workaround() if family == "assistant" else contextlib.nullcontext():
            model = cls(config).eval()
        with torch.no_grad():
            _randomise_constants(model, g)
            # tied embedding / LM head at std 0.3 instead of 0.02: logits of a few units, so the final
            # soft-cap and small numerical errors are visible and greedy choices have clear margins
            emb = model.get_input_embeddings().weight
            emb.copy_(torch.randn(emb.shape, generator=g) * _EMBED_STD)
        if not text_only:
            _calibrate_clip_bounds(model, family, g)
    if dtype != torch.float32:
        model = model.to(dtype)
        model.config.dtype = dtype
    return model


def generation_config(family: str):
    """generation_config.json of a chat model: stop on <eos>, <turn|>, <|tool_response> (tiny-vocab ids)."""
    from transformers import GenerationConfig

    extra = {}
    if family == "unified":  # the 12B suppresses EOI/EOA at sampling (gemma4-architecture.md §6.4)
        extra["suppress_tokens"] = [TOKEN_IDS["<image|>"], TOKEN_IDS["<audio|>"]]
    return GenerationConfig(
        bos_token_id=TOKEN_IDS["<bos>"], eos_token_id=list(GENERATION_EOS_IDS), pad_token_id=TOKEN_IDS["<pad>"],
        do_sample=True, temperature=1.0, top_k=64, top_p=0.95, **extra,
    )


def write_tiny_checkpoint(out_dir, family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                          text_only: bool = False) -> Path:
    """Write a tiny random checkpoint (safetensors + config + generation config + tokenizer + template)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(family, seed=seed, dtype=dtype, text_only=text_only)
    model.generation_config = generation_config(family)
    model.save_pretrained(out, safe_serialization=True)
    save_tiny_tokenizer(out)
    return out


def load_tiny_model(path, family: str | None = None, text_only: bool = False):
    """Reload a tiny checkpoint with transformers (applies the drafter workaround when needed)."""
    import json

    from transformers import AutoModelForCausalLM

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    ctx = assistant_kv_sharing_workaround() if model_type.endswith("assistant") else contextlib.nullcontext()
    with ctx:
        if family is not None:
            return _model_class(family, text_only).from_pretrained(path).eval()
        return AutoModelForCausalLM.from_pretrained(path).eval()


def _cache_root() -> Path:
    return Path(os.environ.get("GEMMA4RT_CACHE") or Path.home() / ".cache" / "gemma4rt").expanduser()


def demo_checkpoint_path() -> Path:
    """The built-in demo model: the full (text + vision + audio) `e` family, DEMO_SEED, float32.

    Created once under `$GEMMA4RT_CACHE/demo-<version>` (default `~/.cache/gemma4rt/demo-<version>`): written
    to a temporary sibling directory, then renamed into place, so readers never see a half-written model.
    """
    final = _cache_root() / f"demo-{DEMO_VERSION}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write_tiny_checkpoint(tmp, DEMO_FAMILY, seed=DEMO_SEED)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gemma4rt.tools.tiny_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output directory")
    p.add_argument("--family", choices=FAMILIES, default="e")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--text-only", action="store_true", help="Gemma4ForCausalLM with the text config only")
    a = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = write_tiny_checkpoint(a.out, a.family, seed=a.seed, dtype=getattr(torch, a.dtype), text_only=a.text_only)
    print(path)


if __name__ == "__main__":
    main()
