"""A personalised concept as every host writes it, and the device rules of a personalization run.

One place for what the ComfyUI node, the A1111 tab and `python -m e4t personalize` must agree on: the
concept's record (`config.concept`), its rounding to file precision, the base-model fingerprint, which
memory mode fits a device and which autocast dtype it trains in.
"""
import hashlib
from dataclasses import asdict

import torch

from .checkpoint import DTYPES, DomainConfig, E4TWeights, pixels_sha256

FAST_MODE_GIB = 46     # a batch-16 fast tune peaked at 44.6 GiB on an H100 (BENCHMARKS.md), plus the host's models


def memory_mode(mode: str, device, total_memory: int | None = None) -> str:
    """'auto' -> 'fast' on the CPU and on GPUs of FAST_MODE_GIB or more, else 'low_vram'; other modes as given.
    total_memory: the device's bytes as the host counts them (default: what torch reports)."""
    if mode != "auto":
        return mode
    device = torch.device(device)
    if device.type == "cpu":
        return "fast"
    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return "fast" if total_memory >= FAST_MODE_GIB * 2**30 else "low_vram"


def autocast_dtype(device):
    """bf16 autocast on GPUs that have it, fp16 on older CUDA GPUs; elsewhere fp32 training."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def base_fingerprint(first_conv: torch.Tensor, last_conv: torch.Tensor) -> str:
    """Identifies a base U-Net by its first and last convolution weights (`input_blocks.0.0`, `out.2`),
    which LoRAs leave alone: a concept applied to another base gets a warning."""
    h = hashlib.sha256()
    for w in (first_conv, last_conv):
        h.update(w.detach().to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()[:16]


def concept_weights(weights: E4TWeights, result, tokens: torch.Tensor, pixels: torch.Tensor, cfg, *,
                    base_fingerprint: str, source: str, host: str, masked: bool = False,
                    precision: str | None = "fp16", domain_word: str | None = None, **record) -> E4TWeights:
    """The concept a tune made: tuned heads, offsets and U-Net delta with the concept image's ViT tokens
    and (h, w, 3) uint8 pixels, and the record in `config.concept` (image hash, base fingerprint, source,
    host, tune settings, losses, plus `record`). With `precision` its tensors are rounded to that file
    precision, so what a host uses now is exactly what a reload of the saved file gives."""
    config = DomainConfig.from_json(asdict(weights.config))
    config.domain_word = domain_word or config.domain_word
    config.reg_lambda = cfg.reg_lambda
    config.encoder = asdict(result.encoder.cfg)          # the sizes of the heads in this file
    config.concept = {"image_sha256": pixels_sha256(pixels), "base_fingerprint": base_fingerprint,
                      "source": source, "host": host, "masked": masked,
                      "tune": {**asdict(cfg), "templates": list(cfg.templates)},
                      "losses": [round(float(x), 6) for x in result.losses], **record}
    for name, module in result.encoder.named_children():     # the heads; the shared ViT stays where the host keeps it
        if name != "clip_vision":
            module.cpu()
    concept = E4TWeights(config=config, encoder=result.encoder, offsets=result.offsets.cpu(),
                         unet_delta={k: v.cpu() for k, v in result.unet_delta.items()},
                         concept_tokens=tokens.detach().cpu(), concept_image=pixels.to("cpu", torch.uint8))
    return concept if precision is None else rounded(concept, DTYPES[precision])


def rounded(weights: E4TWeights, dtype=torch.float16) -> E4TWeights:
    """Round a concept's tensors to `dtype` in place (kept fp32 where hosts compute in fp32)."""
    weights.unet_delta = {k: v.to(dtype) for k, v in weights.unet_delta.items()}
    weights.concept_tokens = weights.concept_tokens.to(dtype)
    for p in weights.encoder.heads():
        p.data = p.data.to(dtype).float()
    weights.offsets.to(dtype).float()
    return weights
