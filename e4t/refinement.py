"""Iterative refinement: the placeholder's embedding predicted afresh at every denoising step.

At each step the current (scheduler-scaled) noisy latent goes through the U-Net's down path and
middle block with the empty-prompt context; the 13 maps (SD1.x) are pooled and, with the cached
concept-image tokens, give E(image, z_t), hence w = e_domain + s E. Works on any CompVis-layout
`UNetModel` (ComfyUI's and A1111's share it): `time_embed`, `input_blocks`, `middle_block`.
"""
import math

import torch

from .encoder import Encoder, ImageFeatures
from .losses import placeholder_word


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the CompVis U-Net, [cos, sin] halves: (b,) -> (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def unet_dtype(unet) -> torch.dtype:
    dtype = getattr(unet, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(unet.parameters()).dtype


def unet_features(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list:
    """Outputs of every `input_blocks` entry, then of `middle_block`: the maps the encoder pools."""
    dtype = unet_dtype(unet)
    t = t.expand(x.shape[0]) if t.dim() == 0 or t.shape[0] == 1 else t
    emb = unet.time_embed(timestep_embedding(t, unet.model_channels).to(x.device, dtype))
    context = context.to(x.device, dtype).expand(x.shape[0], -1, -1)
    h, maps = x.to(dtype), []
    for block in unet.input_blocks:
        h = block(h, emb, context)
        maps.append(h)
    maps.append(unet.middle_block(h, emb, context))
    return maps


def predict_embedding(encoder: Encoder, features: ImageFeatures, unet, x, t, empty_context,
                      e_domain: torch.Tensor, scale: float) -> torch.Tensor:
    """One refinement step: (b, 4, h, w) scaled noisy latent at timestep t -> w (b, word_dim)."""
    maps = unet_features(unet, x, t, empty_context)
    e = encoder(features, maps)
    return placeholder_word(e_domain.to(e.device), e, scale)


class Refinement:
    """Per-sampling-run state: predicts w each step until the timestep drops below `t_stop`,
    then keeps the last prediction (the embedding is frozen for the rest of the run)."""

    def __init__(self, encoder: Encoder, features: ImageFeatures, e_domain, empty_context, scale: float,
                 t_stop: float = 0.0):
        self.encoder, self.features = encoder, features
        self.e_domain, self.empty_context, self.scale, self.t_stop = e_domain, empty_context, scale, t_stop
        self.last = None
        self.history = []  # (t, ‖w - e_domain‖) per prediction, for plots

    def reset(self):
        self.last, self.history = None, []

    @torch.no_grad()
    def __call__(self, unet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_now = float(t.flatten()[0])
        frozen = self.last is not None and t_now < self.t_stop and self.last.shape[0] == x.shape[0]
        if not frozen:
            self.last = predict_embedding(self.encoder, self.features, unet, x, t, self.empty_context,
                                          self.e_domain, self.scale)
            self.history.append((t_now, float((self.last - self.e_domain.to(self.last)).norm(dim=-1).mean())))
        return self.last
