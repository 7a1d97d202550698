"""Tuning: a few optimiser steps of encoder heads, offsets and U-Net on ONE concept image (paper §3.4).

Host-free: the host hands in its U-Net module (CompVis layout), a differentiable `text_encode(prompts,
words)` callable, a `vae_encode(images)` callable and the noise schedule. Nothing the host owns is
modified: heads and offsets are trained on copies, and the U-Net runs with trainable copies of its
weights substituted for the duration of each step, so an interrupted or failed tune leaves every model
exactly as it was.
"""
import copy
import random
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Encoder, ImageFeatures
from .offsets import Offsets
from .optim import CompactAdamW
from .training import Objective, trainable_weights, training_mode

TEMPLATES = {
    "published": ("a photo of {}",),
    "normal": ("a photo of {}", "a picture of {}", "an image of {}", "a close-up photo of {}",
               "a cropped photo of {}", "a good photo of {}", "a bright photo of {}", "a clean photo of {}",
               "a rendition of {}", "a nice photo of {}"),
    "face": ("a portrait of {}", "a headshot of {}", "a photo of {}'s face", "a close-up portrait of {}",
             "a studio portrait of {}", "a face photo of {}", "a photo of {}"),
    "art": ("a painting by {}", "an artwork by {}", "art in the style of {}", "a picture by {}"),
}


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 15
    batch_size: int = 16
    lr: float = 1.6e-5
    reg_lambda: float = 1e-4
    regularizer: str = "published"       # or "paper"
    trains: str = "all"                  # heads + offsets + whole U-Net; "attention": U-Net attention only
    augmentation: str = "published"      # one crop repeated; "varied": n_augmentations cached crops
    n_augmentations: int = 8
    resolution: int = 512
    templates: tuple = TEMPLATES["published"]
    prediction: str = "eps"              # or "v"
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    accumulation: int = 1                # micro-batches per step; batch_size must divide evenly
    checkpointing: bool = False          # recompute U-Net activations in backward (low-VRAM mode)
    optimizer_states: str = "fp32"       # "bf16": Adam's moments in bf16, half its memory (low-VRAM mode)
    seed: int = 0


PRESETS = {
    "published": dict(steps=15, lr=1.6e-5, reg_lambda=1e-4),   # mkshing/e4t-diffusion defaults
    "face": dict(steps=15, lr=1.6e-5, reg_lambda=0.1),         # paper §3.5
    "cat": dict(steps=5, lr=3e-6, reg_lambda=1e-4),
    "art": dict(steps=5, lr=3e-6, reg_lambda=1e-4),
}


def memory_settings(mode: str, batch_size: int) -> dict:
    """TuneConfig fields of a memory mode: "fast", or "low_vram" (gradient checkpointing, micro-batches of 4
    with the same loss, Adam's moments in bf16)."""
    if mode == "fast":
        return {}
    if mode == "low_vram":
        return dict(checkpointing=True, accumulation=4 if batch_size % 4 == 0 else 1, optimizer_states="bf16")
    raise ValueError(f"unknown memory mode {mode!r}: use 'fast' or 'low_vram'")


def preset(name: str, **overrides) -> TuneConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(TuneConfig(**PRESETS[name]), **overrides)


class Interrupted(Exception):
    """Raised when the host's stop flag is set; nothing was changed."""


@dataclass
class TuneResult:
    encoder: Encoder            # tuned heads; the ViT backbone is shared with the input encoder
    offsets: Offsets
    unet_delta: dict            # {CompVis name: W_tuned - W0} for every trained U-Net weight
    losses: list = field(default_factory=list)


def augment(image, mask, resolution: int, generator: torch.Generator):
    """The published augmentation: shortest side to `resolution` (area when shrinking), random
    square crop, horizontal flip with p = 0.5. image (3, H, W) in [-1, 1]; mask (H, W) or None."""
    _, h, w = image.shape
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    mode = dict(mode="area") if scale < 1 else dict(mode="bilinear", align_corners=False)
    stack = image[None] if mask is None else torch.cat([image, mask[None].to(image)])[None]
    stack = F.interpolate(stack.float(), size=size, **mode)[0]
    top = int(torch.randint(0, size[0] - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, size[1] - resolution + 1, (1,), generator=generator))
    stack = stack[:, top:top + resolution, left:left + resolution]
    if torch.rand((), generator=generator) < 0.5:
        stack = stack.flip(-1)
    return stack[:3], (None if mask is None else stack[3])


def trainable_heads(encoder: Encoder, device=None) -> Encoder:
    """A copy of the encoder with fp32 trainable heads on `device`; the frozen ViT backbone is shared,
    not copied and not moved (image features are computed before training)."""
    enc = copy.deepcopy(encoder, memo={id(encoder.clip_vision): encoder.clip_vision})
    for name, module in enc.named_children():
        if name != "clip_vision":
            module.to(device)
    for p in enc.heads():
        p.data = p.data.float()
        p.requires_grad_(True)
    return enc


def _trained_names(unet: nn.Module, trains: str):
    if trains == "all":
        return [n for n, _ in unet.named_parameters()]
    if trains == "attention":
        return [n for n, _ in unet.named_parameters() if ".attn1." in n or ".attn2." in n]
    raise ValueError(f"unknown 'trains' {trains!r}: use 'all' or 'attention'")


def tune(unet: nn.Module, *args, clone_norm_inputs: bool = False, **kwargs) -> "TuneResult":
    """Tune on one image; see `_tune`. Runs with autograd on even when the host is in inference mode.

    clone_norm_inputs: see `training_mode`.
    """
    with training_mode(unet, clone_norm_inputs):
        return _tune(unet, *args, **kwargs)


def _tune(unet: nn.Module, encoder: Encoder, offsets: Offsets, image: torch.Tensor, *, text_encode, vae_encode,
         e_domain: torch.Tensor, empty_context: torch.Tensor, alphas_cumprod: torch.Tensor, scale: float = 0.1,
         placeholder: str = "*", cfg: TuneConfig = TuneConfig(), mask: torch.Tensor | None = None,
         features: ImageFeatures | None = None, progress=None, should_stop=None, autocast_dtype=None) -> TuneResult:
    """Tune on one image (3, H, W) in [-1, 1]; optional mask (H, W) in [0, 1] restricts the loss.

    text_encode(prompts: list[str], words: (b, d)) -> (b, 77, ctx) puts each word at the placeholder;
    vae_encode(images (n, 3, r, r) in [-1, 1]) -> U-Net-space latents, called exactly once here.
    progress(step, total, loss) after every step; should_stop() before every step (True -> Interrupted).
    """
    if cfg.batch_size % cfg.accumulation:
        raise ValueError(f"batch size {cfg.batch_size} is not a multiple of accumulation {cfg.accumulation}")
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    # Data: augmented crops encoded once (never a VAE encode per step).
    n_crops = 1 if cfg.augmentation == "published" else cfg.n_augmentations
    if cfg.augmentation not in ("published", "varied"):
        raise ValueError(f"unknown augmentation {cfg.augmentation!r}: use 'published' or 'varied'")
    crops = [augment(image, mask, cfg.resolution, generator) for _ in range(n_crops)]
    with torch.no_grad():
        latents = vae_encode(torch.stack([c for c, _ in crops]).to(device)).to(device, torch.float32)  # (n, 4, h, w)
    masks = None
    if mask is not None:
        masks = torch.stack([F.interpolate(m[None, None], size=latents.shape[-2:], mode="area")[0] for _, m in crops])
        masks = masks.to(device)
    if features is None:
        with torch.no_grad():
            features = encoder.image_features(image[None].to(device))
    features = ImageFeatures(tokens=features.tokens.detach().clone())

    # Trainable copies: heads, offsets, chosen U-Net weights (fp32 masters); the host's stay untouched.
    enc = trainable_heads(encoder, device)
    offs = copy.deepcopy(offsets).to(device).float().requires_grad_(True).train()
    base = {n: p.detach() for n, p in unet.named_parameters()}
    trained = set(_trained_names(unet, cfg.trains))
    weights = trainable_weights(unet, trained, float32=autocast_dtype is None)
    params = enc.heads() + list(offs.parameters()) + [weights[n] for n in sorted(trained)]
    if cfg.optimizer_states == "bf16":
        opt = CompactAdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    elif cfg.optimizer_states == "fp32":
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                fused=device.type == "cuda")   # one kernel for all parameters on the GPU
    else:
        raise ValueError(f"unknown optimizer_states {cfg.optimizer_states!r}: use 'fp32' or 'bf16'")
    acp = alphas_cumprod.to(device, torch.float32)
    objective = Objective(unet, enc, offs, weights, text_encode, e_domain.detach().to(device, torch.float32).clone(),
                          empty_context.detach().to(device).clone(), acp, scale, cfg.prediction, cfg.regularizer,
                          cfg.reg_lambda, cfg.checkpointing, autocast_dtype)

    losses = []
    for step in range(cfg.steps):
        if should_stop is not None and should_stop():
            raise Interrupted(f"tuning stopped before step {step + 1} of {cfg.steps}; nothing was changed")
        opt.zero_grad(set_to_none=True)
        # The step's randomness is drawn for the whole batch, so accumulation sees the same batch.
        pick = torch.randint(0, n_crops, (cfg.batch_size,), generator=generator)
        noise = torch.randn((cfg.batch_size, *latents.shape[1:]), generator=generator).to(device)
        t = torch.randint(0, len(acp), (cfg.batch_size,), generator=generator).to(device)
        prompts = [rng.choice(cfg.templates).format(placeholder) for _ in range(cfg.batch_size)]
        total = objective.backward(features.tokens, latents[pick], noise, t, prompts,
                                   None if masks is None else masks[pick], cfg.accumulation)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(total)
        if progress is not None:
            progress(step + 1, cfg.steps, total)

    opt.zero_grad(set_to_none=True)
    del opt                                        # gradients and optimizer state go before the deltas are formed
    delta = {n: (weights[n].detach() - base[n].float()) for n in sorted(trained)}
    enc.requires_grad_(False).eval()
    offs.requires_grad_(False).eval()
    return TuneResult(encoder=enc, offsets=offs, unet_delta=delta, losses=losses)
