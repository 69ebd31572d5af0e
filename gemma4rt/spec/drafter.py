"""The Gemma 4 assistant (MTP) drafter, run against the target's KV cache (gemma4-architecture.md §7).

A small Gemma 4 decoder whose layers are all KV-shared: each reads the K/V pages of the target layer that
owns the cache of the target's last layer of its type (SGLang's mapping; for E2B/E4B the layers
transformers marks "store"). One drafting step for a request whose newest token is x at position p, with
g the target's final-normed hidden state of the row that produced x:

    z = pre_projection · [E_target[x]·sqrt(d_target), g];  y = decoder(z) at position p over the target's
    keys at positions < p;  logits = y·E_draftᵀ (or the centroid head);  g' = post_projection · y

and the next step feeds argmax(logits) and g' at the same position over the same keys ("frozen KV").
Drafted tokens never enter any cache. With a chain of one draft per step (top-k 1) the target verifies
them in its next step; greedy verification keeps the output exactly that of plain greedy decoding.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
from torch import nn

from gemma4rt import ops
from gemma4rt.model.context import ForwardContext
from gemma4rt.model.text import Gemma4TextModel, Linear
from gemma4rt.model_config import ModelConfig, TextConfig


class DraftConfigError(ValueError):
    pass


def drafter_text_config(draft: ModelConfig, target: TextConfig) -> TextConfig:
    """The drafter's text config with each layer bound to the target layer whose K/V it reads."""
    if not draft.is_assistant:
        raise DraftConfigError(f"--speculative-draft-model-path: {draft.architecture or draft.model_type} is not a "
                               "Gemma 4 assistant (MTP drafter) checkpoint")
    owner = {}
    for lt in {l.layer_type for l in draft.text.layers}:
        same = [l for l in target.layers if l.layer_type == lt]
        if not same:
            raise DraftConfigError(f"the drafter has {lt} layers, the target none")
        owner[lt] = same[-1].kv_source
    layers = []
    for l in draft.text.layers:
        src = target.layers[owner[l.layer_type]]
        if l.head_dim != src.head_dim:
            raise DraftConfigError(f"drafter layer {l.index} ({l.layer_type}) has head_dim {l.head_dim}, the target's "
                                   f"cache {src.head_dim}: not this target's drafter")
        layers.append(dataclasses.replace(l, kv_shared=True, kv_source=src.index))
    if draft.text.vocab_size != target.vocab_size:
        raise DraftConfigError(f"drafter vocabulary {draft.text.vocab_size} != target's {target.vocab_size}")
    if draft.assistant.backbone_hidden_size != target.hidden_size:
        raise DraftConfigError(f"drafter backbone_hidden_size {draft.assistant.backbone_hidden_size} != the target's "
                               f"hidden size {target.hidden_size}: not this target's drafter")
    return dataclasses.replace(draft.text, layers=tuple(layers))


class Drafter(nn.Module):
    def __init__(self, draft: ModelConfig, target: TextConfig):
        super().__init__()
        self.config = draft
        self.text_cfg = drafter_text_config(draft, target)
        d, b = self.text_cfg.hidden_size, draft.assistant.backbone_hidden_size
        self.language_model = Gemma4TextModel(self.text_cfg)
        self.pre_projection = Linear(2 * b, d)
        self.post_projection = Linear(d, b)
        self.ordered = draft.assistant.use_ordered_embeddings
        if self.ordered:
            self.centroids = Linear(d, draft.assistant.num_centroids)
            self.token_ordering = nn.Parameter(torch.zeros(self.text_cfg.vocab_size, dtype=torch.long),
                                               requires_grad=False)

    def head(self, y: torch.Tensor) -> torch.Tensor:
        """Draft logits [B, V] (fp32). The centroid head scores the top clusters' tokens only; every other
        id gets the smallest of those scores − 1 (transformers' Gemma4AssistantMaskedEmbedder)."""
        w = self.language_model.embed_tokens.weight
        if not self.ordered:
            return ops.linear(y, w).float()
        a = self.config.assistant
        V = self.text_cfg.vocab_size
        top = torch.topk(ops.linear(y, self.centroids.weight), a.centroid_intermediate_top_k, dim=-1).indices
        ids = self.token_ordering.view(a.num_centroids, V // a.num_centroids)[top].reshape(y.shape[0], -1)
        sel = torch.einsum("bd,bkd->bk", y.float(), w[ids].float())
        return (sel.min(dim=-1, keepdim=True).values - 1.0).expand(-1, V).contiguous().scatter_(1, ids, sel)

    def step(self, ctx: ForwardContext, emb: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafting step for ctx's requests (one row each): (logits [B, V] fp32, g' [B, d_target])."""
        lm = self.language_model
        x = ops.linear(torch.cat([emb, g.to(emb.dtype)], dim=-1), self.pre_projection.weight)
        cs = {lt: ops.rope_cos_sin(ctx.positions, f) for lt, f in lm.inv_freq(x.device).items()}
        a, n = None, len(lm.layers)
        for i, layer in enumerate(lm.layers):
            cos, sin = cs[layer.spec.layer_type]
            nxt = lm.layers[i + 1].input_layernorm.weight if i + 1 < n else lm.norm.weight
            x, a = layer(x, ctx, cos, sin, None, None, a, nxt)
        y = a if a is not None else ops.rms_norm(x, lm.norm.weight, self.text_cfg.rms_norm_eps)
        return self.head(y), ops.linear(y, self.post_projection.weight)

    @torch.inference_mode()
    def draft(self, ctx: ForwardContext, tokens: torch.Tensor, hidden: torch.Tensor, target_embed: torch.Tensor,
              embed_scale: float, num_steps: int, vocab_limit: Optional[int] = None) -> torch.Tensor:
        """num_steps greedy drafts per request: [B, num_steps] token ids. ctx: one row per request at the
        position of its newest token `tokens`, seq_lens = that position (keys before it), the target's
        pools and page tables; hidden: the target's final-normed hidden states that produced `tokens`.
        vocab_limit: draft only ids below it (the target samples only those)."""
        out = []
        t, g = tokens, hidden
        for _ in range(num_steps):
            emb = (target_embed[t] * torch.tensor(embed_scale, dtype=target_embed.dtype)).to(target_embed.dtype)
            logits, g = self.step(ctx, emb, g)
            if vocab_limit is not None and vocab_limit < logits.shape[-1]:
                logits[:, vocab_limit:] = float("-inf")
            t = logits.argmax(dim=-1)
            out.append(t)
        return torch.stack(out, dim=1)


def load_drafter(path: str, target: TextConfig, dtype: torch.dtype, device: torch.device,
                 load_format: str = "auto", seed: int = 0) -> Drafter:
    """Build the drafter of `path` (a local checkpoint, a hub id, or a built-in name with load_format
    "dummy") for the target and load its weights."""
    from gemma4rt.model.loader import (CheckpointError, checkpoint_files, init_dummy_weights, load_config,
                                       resolve_model_path, set_tensor)
    builtin = None
    model_dir = None
    if load_format == "dummy" and not os.path.isdir(path):
        from gemma4rt.configs import lookup_builtin_config
        builtin = lookup_builtin_config(path)
    else:
        model_dir = resolve_model_path(path)
    cfg = load_config(model_dir, builtin)
    with torch.device("meta"):
        model = Drafter(cfg, target)
    if model_dir is None:
        init_dummy_weights(model, dtype, device, seed=seed)
        if model.ordered:            # a permutation, as in real checkpoints (dummy init gives arbitrary ints)
            g = torch.Generator().manual_seed(seed)
            set_tensor(model, "token_ordering", torch.randperm(model.text_cfg.vocab_size, generator=g).to(device))
    else:
        from safetensors import safe_open
        params = dict(model.named_parameters())
        loaded = set()
        by_file: dict[str, list[str]] = {}
        for key, f in checkpoint_files(model_dir).items():
            by_file.setdefault(f, []).append(key)
        for f, keys in sorted(by_file.items()):
            with safe_open(f, framework="pt", device="cpu") as fh:
                for key in keys:
                    if key == "lm_head.weight":
                        continue                                    # tied to model.embed_tokens
                    name = ("language_model." + key[len("model."):] if key.startswith("model.") else
                            "centroids.weight" if key == "masked_embedding.centroids.weight" else
                            "token_ordering" if key == "masked_embedding.token_ordering" else key)
                    if name not in params:
                        raise CheckpointError(f"unexpected tensor {key!r} in the drafter checkpoint {model_dir}")
                    t = fh.get_tensor(key)
                    if tuple(t.shape) != tuple(params[name].shape):
                        raise CheckpointError(f"drafter tensor {key!r} has shape {tuple(t.shape)}, expected "
                                              f"{tuple(params[name].shape)}")
                    set_tensor(model, name, t.to(device=device, dtype=dtype if t.is_floating_point() else torch.long))
                    loaded.add(name)
        missing = [n for n in params if n not in loaded]
        if missing:
            raise CheckpointError(f"drafter checkpoint {model_dir} lacks {missing[0]!r}")
    model.language_model.fuse_projections()
    return model.eval()
