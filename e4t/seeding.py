"""What a tune's seed governs, and what it cannot.

The engine draws all of a tune's randomness (crops, flips, noise, timesteps, prompt templates) from
generators seeded by `TuneConfig.seed`, never from torch's global state. A host's own steps may still
draw from the global state (ComfyUI before 2025 samples the VAE posterior with `torch.randn`; A1111's
`get_first_stage_encoding` too): hosts run them under `seeded(seed)`, so the same inputs and seed give
bit-identical tunes on the CPU, on every host, whatever ran before.

What still varies across machines: results are bit-identical only on the same machine type with the
same torch build and thread count. Other CPUs (vector units, thread counts), GPUs, CUDA/cuDNN
versions, dtypes (fp16/bf16 autocast) and the memory mode (micro-batches sum in another order) change
floating-point rounding; on a GPU, `torch.use_deterministic_algorithms(True)` with
`CUBLAS_WORKSPACE_CONFIG=:4096:8` is the setting for identical repeated runs there (not yet checked on a GPU).
"""
import contextlib

import torch


@contextlib.contextmanager
def seeded(seed: int, device=None):
    """Run a host step that draws from torch's global random state from `seed`, leaving that state as it was."""
    device = torch.device(device or "cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
