"""The top-level Gemma 4 model: text decoder (+ multimodal encoders, added by the multimodal work).

`Gemma4Model.from_config(model_config)` builds empty parameters; model/loader.py fills them from a
checkpoint or with random values (`--load-format dummy`).
"""
from __future__ import annotations

import torch
from torch import nn

from gemma4rt.model.context import ForwardContext
from gemma4rt.model.text import Gemma4TextModel
from gemma4rt.model_config import ModelConfig


class Gemma4Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.is_assistant:
            raise NotImplementedError(
                "assistant (MTP drafter) checkpoints are loaded as drafters with "
                "--speculative-draft-model-path, not served on their own")
        self.config = config
        self.language_model = Gemma4TextModel(config.text)
        mm = [t for t in (config.image_token_id, config.audio_token_id, config.video_token_id) if t is not None]
        self.language_model.mm_token_ids = tuple(mm)

    def forward(self, ctx: ForwardContext) -> torch.Tensor:
        """Final-normed hidden states of ctx.logits_indices rows: [N, d]."""
        return self.language_model(ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.logits(hidden)
