"""What tuning and pretraining share: weights substituted into the host's U-Net for a step, optional
gradient checkpointing, and E4T's objective (paper eq. 3) for one optimiser step."""
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .losses import diffusion_loss, noisy, placeholder_word, regularizer, target
from .offsets import merge
from .refinement import unet_dtype, unet_features


@contextmanager
def substituted(module: nn.Module, tensors: dict):
    """Module parameters replaced by the given tensors (keys are parameter names) until the block ends,
    forward and backward alike (gradient checkpointing recomputes inside backward); then put back."""
    saved = []
    try:
        for name, tensor in tensors.items():
            owner, _, attr = name.rpartition(".")
            sub = module.get_submodule(owner)
            saved.append((sub, attr, sub._parameters.pop(attr)))
            setattr(sub, attr, tensor)
        yield module
    finally:
        for sub, attr, param in reversed(saved):
            delattr(sub, attr)
            sub._parameters[attr] = param


@contextmanager
def checkpointed(unet: nn.Module, enabled: bool):
    """Gradient checkpointing per U-Net block: activations are recomputed in backward (low-VRAM mode)."""
    blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks) if enabled else []
    try:
        for block in blocks:
            block.forward = partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)
        yield
    finally:
        for block in blocks:
            del block.forward


@contextmanager
def computing_in(unet: nn.Module, dtype):
    """CompVis U-Nets cast their input to `unet.dtype`; without autocast, training runs in fp32 on fp32
    copies of the weights, so that attribute says fp32 for the duration (restored afterwards)."""
    old = getattr(unet, "dtype", None)
    if dtype is None or not isinstance(old, torch.dtype):
        yield
        return
    unet.dtype = dtype
    try:
        yield
    finally:
        unet.dtype = old


@contextmanager
def training_mode(unet: nn.Module, clone_norm_inputs: bool = False):
    """Autograd on even inside a host's inference mode. clone_norm_inputs: for U-Nets whose transformer
    blocks add residuals in place after a LayerNorm read its input (ComfyUI before 2025), which autograd
    refuses; each LayerNorm then reads a copy. The hooks are removed afterwards."""
    hooks = [m.register_forward_pre_hook(lambda mod, args: (args[0].clone(), *args[1:]))
             for m in unet.modules() if isinstance(m, nn.LayerNorm)] if clone_norm_inputs else []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for h in hooks:
            h.remove()


@dataclass
class Objective:
    """Diffusion loss + embedding regulariser for one optimiser step, gradients into `encoder` (heads),
    `offsets` and every tensor of `weights` that requires grad. ΔW is formed once per step: the merged
    weights become leaves for the U-Net passes, and their gradient flows back to the offsets once."""
    unet: nn.Module
    encoder: nn.Module
    offsets: nn.Module
    weights: dict                # U-Net parameter name -> tensor used for this tune/pretraining
    text_encode: object          # (prompts, words (b, d)) -> (b, 77, ctx), differentiable in words
    e_domain: torch.Tensor
    empty_context: torch.Tensor
    alphas_cumprod: torch.Tensor
    scale: float = 0.1
    prediction: str = "eps"
    regularizer: str = "published"
    reg_lambda: float = 1e-4
    checkpointing: bool = False
    autocast_dtype: torch.dtype | None = None

    def backward(self, tokens, x0, noise, t, prompts, masks=None, accumulation: int = 1) -> float:
        """tokens (b|1, n, d) image features; x0, noise (b, 4, h, w); t (b,); masks (b, 1, h, w) or None.
        Accumulates gradients over `accumulation` micro-batches with the full-batch loss; returns it."""
        from .encoder import ImageFeatures

        acp, device = self.alphas_cumprod, x0.device
        fp32 = self.autocast_dtype is None            # no autocast: everything in fp32 (weights are fp32 copies)
        dtype = torch.float32 if fp32 else unet_dtype(self.unet)
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype, enabled=not fp32)
        def merged_weights():
            return {k: merge(self.weights[k].float(), d) for k, d in self.offsets.deltas().items()}
        # Low-VRAM: what the merge keeps for backward (one weight-sized fp32 tensor per target, 0.26 GiB
        # for SD1.5) is recomputed for the final backward instead of being kept through the step.
        merged = checkpoint(merged_weights, use_reentrant=False) if self.checkpointing else merged_weights()
        leaves = {k: v.detach().requires_grad_() for k, v in merged.items()}                     # fp32 leaves
        swap = self.weights | leaves
        # The diffusion term is a mean and the paper's regulariser a mean: each micro-batch carries its
        # share; the published regulariser is a sum over the batch: each micro-batch adds its own part.
        reg_share = 1.0 if self.regularizer == "published" else 1 / accumulation
        total = 0.0
        for mb in torch.arange(x0.shape[0]).split(x0.shape[0] // accumulation):
            feats = ImageFeatures(tokens=tokens if tokens.shape[0] == 1 else tokens[mb])
            xt = noisy(x0[mb], noise[mb], acp[t[mb]])
            with substituted(self.unet, swap), checkpointed(self.unet, self.checkpointing), \
                    computing_in(self.unet, torch.float32 if fp32 else None):
                with autocast:
                    e = self.encoder(feats, unet_features(self.unet, xt, t[mb], self.empty_context, dtype))
                    w = placeholder_word(self.e_domain, e.float(), self.scale)
                    context = self.text_encode([prompts[i] for i in mb], w).to(dtype)   # hosts may run CLIP in fp16
                    pred = self.unet(xt, timesteps=t[mb], context=context)
                loss = diffusion_loss(pred, target(self.prediction, x0[mb], noise[mb], acp[t[mb]]),
                                      None if masks is None else masks[mb])
                loss = loss / accumulation + reg_share * self.reg_lambda * regularizer(self.regularizer, w, e)
                loss.backward()
            total += float(loss.detach())
        grads = [leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(leaves[k]) for k in merged]
        torch.autograd.backward(list(merged.values()), grads)
        return total


def trainable_weights(unet: nn.Module, trained: set, float32: bool = False) -> dict:
    """fp32 trainable copies of the `trained` U-Net parameters; the rest as they are, or fp32 copies when
    training runs without autocast (`float32`), or clones of inference tensors (autograd cannot save
    those). The host's parameters are never modified."""
    def frozen(p):
        if float32 and p.dtype != torch.float32:
            return p.detach().float()
        return p.detach().clone() if p.is_inference() else p.detach()
    return {n: (p.detach().clone().float().requires_grad_() if n in trained else frozen(p))
            for n, p in unet.named_parameters()}
