"""Checkpoint loading: a local directory or a Hugging Face hub id → a Gemma4Model with weights.

Reads sharded safetensors (with model.safetensors.index.json) memory-mapped, maps HF key names to
our parameters (they share names below the prefix), converts to the working dtype, and names the
missing or unexpected key and its file on error. `load_format="dummy"` fills random weights at the
real geometry instead (for speed and memory measurements).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Optional

import torch

from gemma4rt.model.parallel import NO_TP, TP, shard
from gemma4rt.model_config import ConfigError, ModelConfig, load_model_config, parse_model_config

log = logging.getLogger(__name__)

# Weights of parts the text decoder does not own. They are consumed by the multimodal encoders where
# those are built; a text-only load accepts and skips them.
_MM_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                "model.vision_embedder.")


class CheckpointError(RuntimeError):
    pass


def resolve_model_path(model_path: str, revision: Optional[str] = None) -> str:
    """A local directory as is; otherwise a hub id downloaded with huggingface_hub."""
    if os.path.isdir(model_path):
        return model_path
    if os.path.exists(model_path):
        raise CheckpointError(f"--model-path {model_path!r} is a file; pass the checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model_path, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"])
    except Exception as exc:  # offline, unknown repo, gated, ...
        raise CheckpointError(
            f"could not find {model_path!r} locally nor download it from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). On a machine without internet, download the checkpoint elsewhere (e.g. "
            f"`huggingface-cli download {model_path} --local-dir DIR`), copy it here and pass --model-path DIR; "
            f"or use --load-format dummy with a built-in geometry name such as gemma-4-E4B-it.") from None


def checkpoint_files(model_dir: str) -> dict[str, str]:
    """Tensor name → file, from the index when sharded."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        return {k: os.path.join(model_dir, v) for k, v in wm.items()}
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} holds no *.safetensors files")
    from safetensors import safe_open
    out = {}
    for fn in files:
        path = os.path.join(model_dir, fn)
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                out[k] = path
    return out


def _mm_part(key: str) -> Optional[str]:
    """"vision" / "audio" for a multimodal checkpoint key, else None."""
    if key.startswith(("model.vision_tower.", "model.embed_vision.", "model.vision_embedder.")):
        return "vision"
    if key.startswith(("model.audio_tower.", "model.embed_audio.")):
        return "audio"
    return None


def _strip_prefix(key: str, cfg: ModelConfig) -> Optional[str]:
    """Checkpoint key → our parameter name, or None when the key belongs to no parameter.

    Multimodal keys map one to one below `model.`; the unified 12B's embedder is accepted under both its
    checkpoint name (`model.vision_embedder.*`) and transformers' in-memory name (`model.embed_vision.patch_*`,
    `model.embed_vision.multimodal_embedder.*`)."""
    if _mm_part(key) is not None:
        name = key[len("model."):]
        if name.startswith("embed_vision.multimodal_embedder."):
            return "embed_vision." + name[len("embed_vision.multimodal_embedder."):]
        if name.startswith("embed_vision.") and not name.startswith("embed_vision.embedding_projection"):
            return "vision_embedder." + name[len("embed_vision."):]
        return name
    for pre in ("model.language_model.", "language_model.model.", "model."):
        if key.startswith(pre):
            return "language_model." + key[len(pre):]
    return None


def _expected_ignored(name: str, cfg: ModelConfig) -> bool:
    """Keys present in published files that we deliberately do not use."""
    if name == "lm_head.weight" and cfg.text.tie_word_embeddings:
        return True
    if name.startswith(_MM_PREFIXES):
        part = _mm_part(name)
        if (cfg.vision if part == "vision" else cfg.audio) is None:
            return True          # a tower this model is not built with
        return name.endswith(".pooler.scale")   # an inert key some exports carry (the pooler has no weights)
    if ".self_attn." in name and ".layers." in name:
        try:
            idx = int(name.split(".layers.")[1].split(".")[0])
        except ValueError:
            return False
        if idx < len(cfg.text.layers) and cfg.text.layers[idx].kv_shared:
            tail = name.split(".self_attn.")[1]
            return tail.split(".")[0] in ("k_proj", "v_proj", "k_norm", "v_norm")
    return False


def load_weights(model: torch.nn.Module, cfg: ModelConfig, model_dir: str, dtype: torch.dtype,
                 device: torch.device, progress: bool = True, tp: TP = NO_TP) -> None:
    """Load a checkpoint into `model`; with tensor parallelism (`tp`, model/parallel.py) each tensor is
    cut to this rank's slice before its shape is checked."""
    from safetensors import safe_open
    params = dict(model.named_parameters())
    files = checkpoint_files(model_dir)
    loaded: set[str] = set()
    by_file: dict[str, list[str]] = {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    it: Iterable = sorted(by_file.items())
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(files), desc="Loading weights", unit="tensor", leave=False,
                       disable=not progress or len(files) < 50)
        except ImportError:
            bar = None
    for path, keys in it:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in keys:
                if bar is not None:
                    bar.update(1)
                name = _strip_prefix(key, cfg)
                if _expected_ignored(key, cfg):
                    continue
                if name is None or name not in params:
                    raise CheckpointError(
                        f"unexpected tensor {key!r} in {os.path.basename(path)}: gemma4rt has no parameter for it "
                        f"(architecture {cfg.architecture})")
                t = shard(name, f.get_tensor(key), cfg.text, tp)
                p = params[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise CheckpointError(f"tensor {key!r} in {os.path.basename(path)} has shape {tuple(t.shape)}, "
                                          f"expected {tuple(p.shape)}")
                set_tensor(model, name, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
                loaded.add(name)
    if bar is not None:
        bar.close()
    missing = [n for n in params if n not in loaded]
    if missing:
        raise CheckpointError(
            f"checkpoint {model_dir} is missing {len(missing)} tensor(s), first: "
            f"{_hf_name(missing[0], cfg)!r} (expected in {sorted(set(os.path.basename(v) for v in files.values()))})")


def set_tensor(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    """Replace parameter `name` (e.g. built on the meta device) by tensor t."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)


def _hf_name(name: str, cfg: ModelConfig) -> str:
    """Our parameter name -> the checkpoint key it comes from."""
    if name.startswith("language_model."):
        prefix = "model.language_model." if cfg.is_multimodal_checkpoint else "model."
        return prefix + name[len("language_model."):]
    return "model." + name


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, seed: int = 0,
                       tp: TP = NO_TP) -> None:
    """Random weights at the real geometry: norms and scalars near 1 (q/k norms near head_dim^-1/4),
    matrices N(0, 1/sqrt(fan_in)). Each parameter is drawn from a seed of its own name. With tensor
    parallelism (`tp.size > 1`; `model` a Gemma4Model) a sharded parameter is drawn at its whole,
    unsharded shape and cut to this rank's slice as a checkpoint tensor is (`shard`), so that every
    `--tp` holds the same model as one GPU."""
    import zlib
    full_shapes: dict[str, tuple] = {}
    if tp.size > 1:
        with torch.device("meta"):
            whole = type(model)(model.config, NO_TP)
        full_shapes = {n: tuple(p.shape) for n, p in whole.named_parameters()}
        del whole
    on_cuda = str(device).startswith("cuda")
    g = torch.Generator(device="cpu")
    gd = torch.Generator(device=device) if on_cuda else None
    for name, p in model.named_parameters():
        shape = full_shapes.get(name, tuple(p.shape))
        s = seed * 1000003 + zlib.crc32(name.encode())
        g.manual_seed(s)
        if gd is not None:
            gd.manual_seed(s)
        leaf = name.rsplit(".", 1)[-1]
        if len(shape) == 0:      # clipped-linear bounds of the encoders: no clipping
            set_tensor(model, name, torch.tensor(float("-inf") if leaf.endswith("_min") else float("inf"),
                                                 dtype=dtype, device=device))
            continue
        if leaf == "layer_scalar" or name.endswith("per_expert_scale") or name.endswith("router.scale") \
                or (len(shape) == 1):
            t = 1.0 + 0.1 * (torch.rand(shape, generator=g) - 0.5)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # attention scale is 1.0: unit q/k norms would give logits of std sqrt(head_dim), an
                # almost hard argmax whose winner flips with bf16 rounding (a chaotic random model);
                # head_dim^-1/4 on each side gives unit-variance logits, as trained weights do
                t = t * shape[-1] ** -0.25
            t = t.to(device=device, dtype=dtype)
        elif on_cuda:
            t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, shape[-1] ** -0.5, generator=gd)
        else:
            t = (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(dtype=dtype)
        if tp.size > 1:
            t = shard(name, t, model.config.text, tp).contiguous()
            if tuple(t.shape) != tuple(p.shape):
                raise RuntimeError(f"dummy {name}: shard of {shape} is {tuple(t.shape)}, expected {tuple(p.shape)}")
        set_tensor(model, name, t)


def load_config(model_dir: Optional[str], builtin: Optional[dict] = None) -> ModelConfig:
    if model_dir is not None:
        return load_model_config(model_dir)
    if builtin is None:
        raise ConfigError("no checkpoint directory and no built-in geometry")
    return parse_model_config(builtin)


__all__ = ["CheckpointError", "resolve_model_path", "load_weights", "init_dummy_weights", "load_config",
           "checkpoint_files"]
