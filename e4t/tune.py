"""Tuning: a few optimiser steps of encoder heads, offsets and U-Net on ONE concept image (paper §3.4).

Host-free: the host hands in its U-Net module (CompVis layout), a differentiable `text_encode(prompts,
words)` callable, a `vae_encode(images)` callable and the noise schedule. Nothing the host owns is
modified: heads and offsets are trained on copies, and the U-Net runs as a structural clone (new module
objects sharing the host's tensors) with trainable weights substituted, so an interrupted or failed tune
leaves every model exactly as it was.

Memory modes (`memory_settings`): "fast" trains fp32 master copies with torch's AdamW; "low_vram" trains bf16
deltas on the host's frozen U-Net weights, recomputes activations per layer, keeps Adam's moments in 8 bits and
runs the optimizer step inside backward, so no full set of gradients is ever held (see README for its figures).
"""
import math
import copy
import random
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Encoder, ImageFeatures
from .offsets import OffsetGroups, Offsets
from .optim import CompactAdamW, adamw
from .precision import Precision, training_precision
from . import training
from .training import Objective, UNetWeights, structural_clone, training_mode

TEMPLATES = {                            # "published": the tune's prompts; "normal": pre-training's
    "published": ("a photo of {}",),
    "normal": ("a photo of {}", "a picture of {}", "an image of {}", "a close-up photo of {}",
               "a cropped photo of {}", "a good photo of {}", "a bright photo of {}", "a clean photo of {}",
               "a rendition of {}", "a nice photo of {}"),
}


GRAD_CLIP = 1.0                          # global gradient-norm clipping of the published tune (not with fused_step)


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 15
    batch_size: int = 16
    lr: float = 1.6e-5
    reg_lambda: float = 1e-4             # the one tune default, shown by both hosts and the CLI (published; see DomainConfig)
    trains: str = "all"                  # heads + offsets + whole U-Net; "attention": U-Net attention only
    augmentation: str = "published"      # one crop repeated; "varied": n_augmentations cached crops
    n_augmentations: int = 8
    resolution: int = 512
    prediction: str = "eps"              # or "v"
    weight_decay: float = 0.01
    accumulation: int = 1                # micro-batches per step; batch_size must divide evenly
    checkpointing: bool = False          # recompute U-Net activations in backward (low-VRAM mode)
    layer_chunk: int = 0                 # with checkpointing: samples per layer run and recompute (0: whole batch)
    optimizer_states: str = "fp32"       # Adam's moments stored in "fp32", "bf16" (half) or "8bit" (a quarter)
    offload_optimizer: bool = False      # on a GPU: Adam's moments held in CPU memory, moved in a piece at a time
    offload_activations: bool = False    # activations kept for backward held in CPU memory (on a GPU)
    unet_weights: str = "master"         # "master": fp32 trainable copies; "delta": bf16 deltas on the host's weights
    fused_step: bool = False             # optimizer step inside backward: no persistent gradients, no global clipping
    seed: int = 0


PRESETS = {
    "published": dict(steps=15, lr=1.6e-5, reg_lambda=1e-4),   # mkshing/e4t-diffusion defaults
    "face": dict(steps=15, lr=1.6e-5, reg_lambda=0.1),         # paper §3.5
    "cat": dict(steps=5, lr=3e-6, reg_lambda=1e-4),
    "art": dict(steps=5, lr=3e-6, reg_lambda=1e-4),
}


MEMORY_MODES = {
    "fast": {},
    # the same recipe (heads + offsets + U-Net, the whole batch, AdamW), without fp32 copies or stored gradients
    "low_vram": dict(checkpointing=True, optimizer_states="8bit", unet_weights="delta", fused_step=True,
                     layer_chunk=4, offload_optimizer=True, offload_activations=True),
}


def memory_settings(mode: str) -> dict:
    """TuneConfig fields of a memory mode (see the module docstring)."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {mode!r}: use {' or '.join(map(repr, MEMORY_MODES))}")
    return dict(MEMORY_MODES[mode])


def preset(name: str, **overrides) -> TuneConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(TuneConfig(**PRESETS[name]), **overrides)


def base_weights_notice(left_out: list) -> str | None:
    """The one rule of both hosts for LoRAs (and any other weight patch) active when a tune starts: the tune
    starts from the base checkpoint's own U-Net and CLIP weights, without them, and they stay where the user put
    them (ComfyUI: on the MODEL E4T Personalize returns; A1111: in the prompt of the next generation).

    Why: a concept stores the U-Net change against the base model it names by fingerprint, and is loaded on
    that base with whatever LoRA the user picks then. Tuned on top of a LoRA it would depend on it without
    recording it, and the tune's steps on one photo would partly train the LoRA's effect out again. Tuned on
    the base, concept and LoRA compose at sampling.

    left_out: what the tune leaves out, in the host's words (LoRA names, counts of patched weights). Returns the
    line the host shows, or None when nothing was left out."""
    if not left_out:
        return None
    return ("E4T tunes on the base checkpoint's own weights; left out of the tune (still applied when sampling): "
            + ", ".join(map(str, left_out)))


class Interrupted(Exception):
    """Raised when the host's stop flag is set; nothing was changed."""


class Diverged(ValueError):
    """The loss or a gradient stopped being finite; the tune stops and nothing is changed."""


@dataclass
class TuneResult:
    encoder: Encoder            # tuned heads; the ViT backbone is shared with the input encoder
    offsets: Offsets
    unet_delta: dict            # {CompVis name: W_tuned - W0} for every trained U-Net weight (fp32, or bf16 deltas)
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


def whole_step(cfg: TuneConfig) -> bool:
    """Whether a step is one whole forward and backward into torch's AdamW (the fast mode): only then does the
    tune train in the few-tensor layouts (first_linears stacked, the U-Net's masters flat). Each forms its gradient
    whole at the end of backward and the masters' cast lives through the step; with accumulation, checkpointing,
    offloading or the compact optimizer (which copies a tensor's gradient whole to step it) that costs GiBs: +4 to
    +8 GiB at full size with checkpointing and 16 micro-batches (`benchmarks/memory.py`)."""
    return (cfg.unet_weights == "master" and cfg.optimizer_states == "fp32" and cfg.accumulation == 1
            and not (cfg.fused_step or cfg.checkpointing or cfg.offload_optimizer or cfg.offload_activations))


def trainable_heads(encoder: Encoder, device=None, stacked: bool = False) -> Encoder:
    """A copy of the encoder with fp32 trainable heads on `device`; the frozen ViT backbone is shared,
    not copied and not moved (image features are computed before training). stacked: `first_linears` as one
    tensor (`StackedLinears`, the fast tune's layout; `unstack_first_linears` gives the published one back)."""
    shared = [encoder.clip_vision] + ([encoder.first_linears] if stacked else [])
    enc = copy.deepcopy(encoder, memo={id(m): m for m in shared})
    if stacked:
        enc.stack_first_linears(device)
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


def tune(unet: nn.Module, *args, clone_norm_inputs: bool | None = None, **kwargs) -> "TuneResult":
    """Tune on one image; see `_tune`. Runs with autograd on even when the host is in inference mode, on a
    structural clone of `unet`.

    clone_norm_inputs: see `training_mode` (None: found by probing the U-Net).
    """
    work = structural_clone(unet)
    with training_mode(work, clone_norm_inputs):
        return _tune(work, *args, **kwargs)


def _diverged(what: str, step: int, cfg: TuneConfig, precision: Precision) -> Diverged:
    return Diverged(
        f"the tune stopped at step {step} of {cfg.steps}: the {what} is no longer a finite number ({precision.name}, "
        f"lr {cfg.lr:g}); nothing was changed. Lower the learning rate (e.g. {cfg.lr / 10:g}), check that the image "
        f"and mask hold finite values, or use fewer steps.")


def _tune(unet: nn.Module, encoder: Encoder, offsets: Offsets, image: torch.Tensor, *, text_encode, vae_encode,
         e_domain: torch.Tensor, empty_context: torch.Tensor, alphas_cumprod: torch.Tensor, scale: float = 0.1,
         placeholder: str = "*", cfg: TuneConfig = TuneConfig(), mask: torch.Tensor | None = None,
         features: ImageFeatures | None = None, progress=None, should_stop=None, precision: Precision | None = None) -> TuneResult:
    """Tune on one image (3, H, W) in [-1, 1]; optional mask (H, W) in [0, 1] restricts the loss.

    text_encode(prompts: list[str], words: (b, d)) -> (b, 77, ctx) puts each word at the placeholder;
    vae_encode(images (n, 3, r, r) in [-1, 1]) -> U-Net-space latents, called exactly once here.
    progress(step, total, loss) after every step; should_stop() before every step (True -> Interrupted).
    precision: autocast dtype and loss scaling; default: `training_precision` of the U-Net's device.
    A loss or gradient that is not finite raises Diverged (fp16 overflows first lower the loss scale).
    """
    if cfg.batch_size % cfg.accumulation:
        raise ValueError(f"batch size {cfg.batch_size} is not a multiple of accumulation {cfg.accumulation}")
    if cfg.fused_step and cfg.accumulation != 1:
        raise ValueError("fused_step updates weights inside backward: it needs accumulation 1")
    device = next(unet.parameters()).device
    precision = precision or training_precision(device)
    autocast_dtype = precision.autocast
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

    # Trainable copies: heads, offsets (fp32), U-Net weights (fp32 masters or bf16 deltas); the host's stay untouched.
    whole = whole_step(cfg)
    enc = trainable_heads(encoder, device, stacked=whole)
    offs = OffsetGroups(offsets, device).requires_grad_(True).train()
    trained = set(_trained_names(unet, cfg.trains))
    compute = (autocast_dtype or torch.float32) if cfg.unet_weights == "delta" else (None if autocast_dtype else torch.float32)
    weights = UNetWeights(unet, trained, cfg.unet_weights, compute, cast=autocast_dtype, merged=set(offsets.targets),
                          flat=whole)
    params = enc.heads() + list(offs.parameters()) + weights.trainable()
    if cfg.optimizer_states == "fp32" and not (cfg.fused_step or cfg.offload_optimizer) and cfg.unet_weights == "master":
        opt = adamw(params, device, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    else:
        opt = CompactAdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                           states=cfg.optimizer_states, bases=weights.bases(),
                           held="cpu" if cfg.offload_optimizer and training.offloads(device) else None)
    if cfg.fused_step:
        opt.step_in_backward()
    acp = alphas_cumprod.to(device, torch.float32)
    objective = Objective(unet, enc, offs, weights, text_encode, e_domain.detach().to(device, torch.float32).clone(),
                          empty_context.detach().to(device).clone(), acp, scale, cfg.prediction,
                          cfg.reg_lambda, cfg.checkpointing, autocast_dtype, cfg.layer_chunk, cfg.offload_activations)
    loss_scale = precision.loss_scale

    losses = []
    for step in range(cfg.steps):
        if should_stop is not None and should_stop():
            raise Interrupted(f"tuning stopped before step {step + 1} of {cfg.steps}; nothing was changed")
        # The step's randomness is drawn for the whole batch, so accumulation sees the same batch.
        pick = torch.randint(0, n_crops, (cfg.batch_size,), generator=generator)
        noise = torch.randn((cfg.batch_size, *latents.shape[1:]), generator=generator).to(device)
        t = torch.randint(0, len(acp), (cfg.batch_size,), generator=generator).to(device)
        prompts = [rng.choice(TEMPLATES["published"]).format(placeholder) for _ in range(cfg.batch_size)]
        while True:                                # once, or again with a halved loss scale after an fp16 overflow
            if cfg.fused_step:
                opt.begin()
                opt.loss_scale = loss_scale
            else:
                opt.zero_grad(set_to_none=True)
            total = objective.backward(features.tokens, latents[pick], noise, t, prompts,
                                       None if masks is None else masks[pick], cfg.accumulation, loss_scale)
            if not math.isfinite(total):
                raise _diverged("loss", step + 1, cfg, precision)
            if _stepped(opt, params, cfg, loss_scale):
                break
            if loss_scale <= 1.0:
                raise _diverged("gradient", step + 1, cfg, precision)
            loss_scale /= 2
        losses.append(total)
        if progress is not None:
            progress(step + 1, cfg.steps, total)

    if cfg.fused_step:
        opt.remove()
    opt.zero_grad(set_to_none=True)
    del opt                                        # gradients and optimizer state go before the deltas are formed
    delta = weights.delta()
    enc.unstack_first_linears().requires_grad_(False).eval()
    offs = offs.offsets().requires_grad_(False).eval()
    return TuneResult(encoder=enc, offsets=offs, unet_delta=delta, losses=losses)


def _stepped(opt, params, cfg: TuneConfig, loss_scale: float) -> bool:
    """The optimizer step of the gradients just computed (already done inside backward with fused_step); False when
    a gradient is not finite: with a loss scale above 1 the caller retries the step with a lower one (buckets already
    updated are skipped), else it stops the tune."""
    if cfg.fused_step:
        if not opt.finished():
            return False
        finite, opt.finite = opt.finite, None
        return finite is None or bool(finite)
    grads = [p.grad for p in params if p.grad is not None]
    if loss_scale != 1.0:
        torch._foreach_mul_(grads, 1 / loss_scale)
    if not math.isfinite(float(torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP))):
        return False
    opt.step()
    return True
