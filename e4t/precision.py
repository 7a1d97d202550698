"""One precision policy for tuning, used by both hosts: what the U-Net computes in, and whether the loss is scaled.

- CUDA with native bf16 (compute capability 8.0 and newer, or a ROCm GPU that has it): bf16 autocast. bf16 keeps
  fp32's exponent range, so gradients neither underflow nor overflow and no loss scaling is needed.
- Other CUDA GPUs (T4, V100, RTX 20xx, GTX 10xx): fp16 autocast with dynamic loss scaling. `torch.cuda.
  is_bf16_supported()` also counts emulated bf16, which runs those GPUs' matmuls far slower; unscaled fp16
  gradients underflow to exact zeros.
- Apple MPS: fp16 autocast with loss scaling where this torch has MPS autocast, else fp32.
- CPU: fp32 (CPU autocast is slower than fp32 for these models, and fp32 needs no scaling).
"""
from dataclasses import dataclass

import torch

FP16_LOSS_SCALE = 2.0 ** 14     # first scale of a tune; halved on each overflow (the step is then redone)


@dataclass(frozen=True)
class Precision:
    autocast: torch.dtype | None    # None: weights and activations in fp32
    loss_scale: float = 1.0         # > 1: fp16 dynamic loss scaling starting there

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast]


def native_bf16(device) -> bool:
    """bf16 that the GPU computes natively, not emulated."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:                                     # torch < 2.4 counts no emulation
        return torch.cuda.get_device_capability(device) >= (8, 0) or bool(torch.version.hip)


def training_precision(device, half: bool = True) -> Precision:
    """The policy above for `device`; half=False (a host started in full precision) gives fp32 everywhere."""
    device = torch.device(device)
    if not half or device.type == "cpu":
        return Precision(None)
    if device.type == "cuda":
        return Precision(torch.bfloat16) if native_bf16(device) else Precision(torch.float16, FP16_LOSS_SCALE)
    if device.type == "mps":
        available = getattr(torch.amp, "is_autocast_available", lambda kind: False)
        return Precision(torch.float16, FP16_LOSS_SCALE) if available("mps") else Precision(None)
    return Precision(None)
