"""Iterative refinement: the placeholder's embedding predicted afresh at every denoising step.

At each step the current (scheduler-scaled) noisy latent goes through the U-Net's down path and
middle block with the empty-prompt context; the 13 maps (SD1.x) are pooled and, with the cached
concept-image tokens, give E(image, z_t), hence w = e_domain + s E. Works on any CompVis-layout
`UNetModel` (ComfyUI's and A1111's share it): `time_embed`, `input_blocks`, `middle_block`.
"""
import math

import torch

from .losses import placeholder_word
from .validate import NonFiniteError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the CompVis U-Net, [cos, sin] halves: (b,) -> (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def unet_dtype(unet) -> torch.dtype:
    dtype = getattr(unet, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(unet.parameters()).dtype


def unet_features(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, dtype=None) -> list:
    """Outputs of every `input_blocks` entry, then of `middle_block`: the maps the encoder pools."""
    dtype = dtype or unet_dtype(unet)
    t = t.expand(x.shape[0]) if t.dim() == 0 or t.shape[0] == 1 else t
    emb = unet.time_embed(timestep_embedding(t, unet.model_channels).to(x.device, dtype))
    context = context.to(x.device, dtype).expand(x.shape[0], -1, -1)
    h, maps = x.to(dtype), []
    for block in unet.input_blocks:
        h = block(h, emb, context)
        maps.append(h)
    maps.append(unet.middle_block(h, emb, context))
    return maps


def predict_embedding(encoder, unet, x, t, empty_context, e_domain: torch.Tensor, scale: float,
                      dtype=None) -> torch.Tensor:
    """One refinement step: (b, 4, h, w) scaled noisy latent at timestep t -> w (b, word_dim).

    encoder: maps -> E, e.g. a FoldedEncoder (sampling) or `lambda maps: encoder(features, maps)`.
    """
    e = encoder(unet_features(unet, x, t, empty_context, dtype))
    return placeholder_word(e_domain.to(e.device), e.float(), scale)


class Refinement:
    """Per-sampling-run state: predicts w each step until the timestep drops below `t_stop`,
    then keeps the last prediction (the embedding is frozen for the rest of the run)."""

    def __init__(self, encoder, e_domain, empty_context, scale: float, t_stop: float = 0.0):
        self.encoder = encoder
        self.e_domain, self.empty_context, self.scale, self.t_stop = e_domain, empty_context, scale, t_stop
        self.reset()

    def reset(self):
        self.last, self.t_prev = None, None
        self.history = []  # (t, ‖w - e_domain‖) per prediction, for plots

    def due(self, t: torch.Tensor, batch: int) -> bool:
        """Whether the step at timestep t predicts w afresh (False: below `t_stop` the last prediction is
        kept); a timestep above the last one starts a new run."""
        t_now = float(t.flatten()[0])
        if self.t_prev is not None and t_now > self.t_prev:
            self.reset()
        self.t_prev = t_now
        return not (self.last is not None and t_now < self.t_stop and self.last.shape[0] == batch)

    @torch.no_grad()
    def __call__(self, unet, x: torch.Tensor, t: torch.Tensor, dtype=None, maps=None) -> torch.Tensor:
        """x: the scheduler-scaled latent. maps: the U-Net's down/mid outputs for x, t and the empty context
        when the host's unconditional pass already computed them (then the feature pass is not run here)."""
        if self.due(t, x.shape[0]):
            e = self.encoder(maps if maps is not None else unet_features(unet, x, t, self.empty_context, dtype))
            self.last = placeholder_word(self.e_domain.to(e.device), e.float(), self.scale)
            norm = float((self.last - self.e_domain.to(self.last)).norm(dim=-1).mean())     # one sync per step
            t_now = float(t.flatten()[0])
            if not math.isfinite(norm):
                self.last = None
                raise NonFiniteError(_non_finite(x, t_now))
            self.history.append((t_now, norm))
        return self.last


def _non_finite(x: torch.Tensor, t: float) -> str:
    source = ("the sampler's latent already was (the model or an earlier node made NaN or infinite values)"
              if not bool(torch.isfinite(x).all()) else
              "the model produced them from a finite latent (half precision overflowing, or a damaged concept "
              "or checkpoint)")
    return (f"E4T stopped sampling: the placeholder's embedding is NaN or infinite at timestep {t:.0f}; {source}. "
            f"Nothing was changed: try the model in fp32 or bf16, a lower strength, or re-make the concept")
