"""What a tune's seed governs, and what it cannot.

The engine draws all of a tune's randomness (crops, flips, noise, timesteps, prompt templates) from
generators seeded by `TuneConfig.seed`, never from torch's global state. A host's own steps may still
draw from the global state (ComfyUI before 2025 samples the VAE posterior with `torch.randn`; A1111's
`get_first_stage_encoding` too): hosts run them under `seeded(seed)`, so the same inputs and seed give
bit-identical tunes on the CPU, on every host, whatever ran before.

The arithmetic must repeat too. With more than one CPU thread, the MKL inside torch's x86 builds picks
its code path per call by default, and a threaded SGEMM may then sum in another order from one run to
the next: torch's convolution input gradient on a 1x1 feature map with one sample (the SD1 U-Net's
deepest level at resolution 64) differed in the last bits between two same-seed tunes in one process.
Intel's conditional numerical reproducibility (CNR, `MKL_CBWR=AUTO`) fixes the path; hosts turn it on
with `reproducible_cpu_math` from their earliest hook, before torch's first MKL call.

What still varies across machines: results are bit-identical only on the same machine type with the
same torch build and thread count. Other CPUs (vector units, thread counts), GPUs, CUDA/cuDNN
versions, dtypes (fp16/bf16 autocast) and the memory mode (micro-batches sum in another order) change
floating-point rounding; on a GPU, `torch.use_deterministic_algorithms(True)` with
`CUBLAS_WORKSPACE_CONFIG=:4096:8` is the setting for identical repeated runs there (not yet checked on a GPU).
"""
import contextlib
import ctypes
import glob
import os

import torch

_MKL_CBWR_BRANCH, _MKL_CBWR_BRANCH_OFF = 1, 1      # mkl_cbwr_get(MKL_CBWR_BRANCH) -> the code path; OFF: per call


@contextlib.contextmanager
def seeded(seed: int, device=None):
    """Run a host step that draws from torch's global random state from `seed`, leaving that state as it was."""
    device = torch.device(device or "cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def reproducible_cpu_math() -> bool | None:
    """Ask torch's MKL for reproducible CPU results (CNR, `MKL_CBWR=AUTO`; a user's own MKL_CBWR is kept).
    MKL reads it once, when it starts: call this before anything computes on the CPU.

    Returns True when MKL runs with a fixed code path, False when it does not (it started earlier, or
    MKL_CBWR says so), None where torch has no MKL or does not show its state (only Linux builds do)."""
    os.environ.setdefault("MKL_CBWR", "AUTO")
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so*"))[0])
        return lib.mkl_serv_cbwr_get(_MKL_CBWR_BRANCH) != _MKL_CBWR_BRANCH_OFF
    except (IndexError, OSError, AttributeError):
        return None
