"""Placeholder embedding, regularisers and the diffusion loss (paper eq. 1-3)."""
import torch


def sd1_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """SD1.x training schedule: scaled-linear betas from 0.00085 to 0.012."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def alphas_cumprod_of(model_sampling) -> torch.Tensor:
    """ᾱ of a host's discrete schedule: its `alphas_cumprod`, or from its sigmas (σ² = (1 - ᾱ) / ᾱ)."""
    acp = getattr(model_sampling, "alphas_cumprod", None)
    if acp is None:
        acp = 1 / (1 + model_sampling.sigmas.double() ** 2)
    return acp.float()


def placeholder_word(e_domain: torch.Tensor, e: torch.Tensor, scale: float) -> torch.Tensor:
    """w = e_domain + s * E(image, noisy latent)."""
    return e_domain.to(e.dtype) + scale * e


def regularizer(w: torch.Tensor) -> torch.Tensor:
    """Σ w² over the batch and the whole injected vector (domain embedding included), as mkshing/e4t-diffusion
    trains (the paper's eq. 2 writes a mean of E(...)² instead; the published weights were trained with this)."""
    return w.float().pow(2).sum()


def noisy(x0, noise, acp_t):
    """z_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε, ᾱ per batch element."""
    a = acp_t.view(-1, 1, 1, 1).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(prediction: str, x0, noise, acp_t):
    """What the U-Net should predict: ε, or the velocity sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        a = acp_t.view(-1, 1, 1, 1).to(x0.dtype)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction type {prediction!r}: use 'eps' or 'v'")


def diffusion_loss(pred, tgt, mask=None):
    """Mean squared error in fp32; with a mask (b|1, 1, h, w) in [0, 1], the mean over masked pixels only."""
    err = (pred.float() - tgt.float()).pow(2)
    if mask is None:
        return err.mean()
    mask = mask.to(err).expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1e-8)
