"""The top-level Gemma 4 model: text decoder + multimodal encoders.

`Gemma4Model(model_config)` builds empty parameters; model/loader.py fills them from a checkpoint or with
random values (`--load-format dummy`). Submodule names equal the checkpoint names below `model.`:
`language_model`, `vision_tower` + `embed_vision` (ViT models), `audio_tower` + `embed_audio` (E2B/E4B),
`vision_embedder` + `embed_vision` / `embed_audio` (the encoder-free unified 12B).
`encode_image` / `encode_audio` turn one preprocessed item into its soft tokens [n, d]
(worker/mm_inputs.py calls them; the array names are documented in frontend/mm_preprocess.py).
"""
from __future__ import annotations

import torch
from torch import nn

from gemma4rt.model.audio import AudioTower
from gemma4rt.model.context import ForwardContext
from gemma4rt.model.parallel import NO_TP, TP
from gemma4rt.model.text import Gemma4TextModel
from gemma4rt.model.unified_mm import UnifiedVisionEmbedder, audio_frames
from gemma4rt.model.vision import MultimodalEmbedder, VisionTower
from gemma4rt.model_config import ModelConfig

_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16,
                    "num_attention_heads": 12, "head_dim": 64, "patch_size": 16, "pooling_kernel_size": 3,
                    "position_embedding_size": 10240, "rms_norm_eps": 1e-6, "use_clipped_linears": False,
                    "standardize": False, "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0}}
_AUDIO_DEFAULTS = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 8, "hidden_act": "silu",
                   "subsampling_conv_channels": [128, 32], "conv_kernel_size": 5, "residual_weight": 0.5,
                   "attention_chunk_size": 12, "attention_context_left": 13, "attention_context_right": 0,
                   "attention_logit_cap": 50.0, "attention_invalid_logits_value": -1e9,
                   "use_clipped_linears": True, "rms_norm_eps": 1e-6, "gradient_clipping": 1e10,
                   "output_proj_dims": 1536}


def vision_config(cfg: ModelConfig) -> dict:
    """The vision config dict with the transformers defaults filled in."""
    v = {**_VISION_DEFAULTS, **{k: x for k, x in (cfg.vision or {}).items() if x is not None}}
    v.setdefault("num_key_value_heads", v["num_attention_heads"])
    return v


def audio_config(cfg: ModelConfig) -> dict:
    return {**_AUDIO_DEFAULTS, **{k: x for k, x in (cfg.audio or {}).items() if x is not None}}


class Gemma4Model(nn.Module):
    def __init__(self, config: ModelConfig, tp: TP = NO_TP):
        super().__init__()
        if config.is_assistant:
            raise NotImplementedError(
                "assistant (MTP drafter) checkpoints are loaded as drafters with "
                "--speculative-draft-model-path, not served on their own")
        self.config = config
        self.language_model = Gemma4TextModel(config.text, tp)
        mm = [t for t in (config.image_token_id, config.audio_token_id, config.video_token_id) if t is not None]
        self.language_model.mm_token_ids = tuple(mm)
        d = config.text.hidden_size
        if config.is_unified:
            if config.vision is not None:
                v = {"patch_size": 16, "pooling_kernel_size": 3, "mm_embed_dim": 3840, "mm_posemb_size": 1120,
                     "rms_norm_eps": 1e-6, **{k: x for k, x in config.vision.items() if x is not None}}
                self.vision_embedder = UnifiedVisionEmbedder(v)
                self.embed_vision = MultimodalEmbedder(int(v.get("output_proj_dims", v["mm_embed_dim"])), d,
                                                       v["rms_norm_eps"])
            if config.audio is not None:
                a = config.audio
                n = int(a.get("output_proj_dims") or a.get("audio_embed_dim") or 640)
                self.audio_samples_per_token = n
                self.embed_audio = MultimodalEmbedder(n, d, float(a.get("rms_norm_eps") or 1e-6))
        else:
            if config.vision is not None:
                v = vision_config(config)
                self.vision_tower = VisionTower(v)
                self.embed_vision = MultimodalEmbedder(v["hidden_size"], d, v["rms_norm_eps"])
            if config.audio is not None:
                a = audio_config(config)
                self.audio_tower = AudioTower(a)
                self.embed_audio = MultimodalEmbedder(a["output_proj_dims"], d, a["rms_norm_eps"])

    @property
    def has_vision(self) -> bool:
        return hasattr(self, "embed_vision")

    @property
    def has_audio(self) -> bool:
        return hasattr(self, "embed_audio")

    def encode_image(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One image (or video frame): pixel_values [N, P], position_ids [N, 2] (−1 = padding) → soft
        tokens [n, d] in the model dtype."""
        if not self.has_vision:
            raise ValueError("this model has no vision encoder")
        if hasattr(self, "vision_embedder"):
            h = self.vision_embedder(pixel_values, position_ids)
        else:
            h = self.vision_tower(pixel_values, position_ids)
        return self.embed_vision(h)

    def encode_audio(self, input_features: torch.Tensor, input_features_mask=None) -> torch.Tensor:
        """One clip → soft tokens [n, d]. Conformer models: log-mel input_features [T, M] with
        input_features_mask [T]; the unified 12B: frames [N, 640] (or raw samples [S])."""
        if not self.has_audio:
            raise ValueError("this model has no audio encoder")
        if hasattr(self, "audio_tower"):
            return self.embed_audio(self.audio_tower(input_features, input_features_mask))
        x = input_features
        if x.dim() == 1:
            x = audio_frames(x, self.audio_samples_per_token)
        if input_features_mask is not None:
            x = x[input_features_mask.bool()]
        return self.embed_audio(x)

    def forward(self, ctx: ForwardContext) -> torch.Tensor:
        """Final-normed hidden states of ctx.logits_indices rows: [N, d]."""
        return self.language_model(ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.logits(hidden)
