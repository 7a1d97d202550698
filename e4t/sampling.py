"""A small DDIM sampler with per-step refinement, for the sample images pretraining writes.

Hosts sample with their own samplers; this exists so the host-free pretraining loop can show progress.
"""
import torch

from .refinement import unet_dtype


@torch.no_grad()
def ddim(unet, refine, text_encode, prompt: str, empty_context, alphas_cumprod, shape, steps: int = 25,
         guidance: float = 7.5, generator=None, prediction: str = "eps"):
    """refine(x, t) -> w (b, d); text_encode([prompt] * b, w) -> context. Returns the final latent (b, 4, h, w)."""
    device, dtype = empty_context.device, unet_dtype(unet)
    acp = alphas_cumprod.to(device, torch.float32)
    ts = torch.linspace(len(acp) - 1, 0, steps, device=device).round().long()
    x = torch.randn(shape, generator=generator).to(device)
    b = shape[0]
    for i, t in enumerate(ts):
        tt = t.expand(b)
        w = refine(x, tt)
        context = torch.cat([empty_context.expand(b, -1, -1), text_encode([prompt] * b, w).to(empty_context)])
        out = unet(torch.cat([x, x]).to(dtype), timesteps=torch.cat([tt, tt]), context=context.to(dtype)).float()
        uncond, cond = out.chunk(2)
        out = uncond + guidance * (cond - uncond)
        a = acp[t]
        if prediction == "v":
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, (1 - a).sqrt() * x + a.sqrt() * out
        else:
            x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
        a_next = acp[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=device)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x
