"""E4T weights as ComfyUI weight patches that stack with LoRA in graph order.

Order of application for a key: every patch already on the MODEL (e.g. a LoRA loaded before this
node), then the tuned U-Net delta D, then the offsets: W = (W_in + D) * (1 + s ΔW). On hosts with
weight adapters (ComfyUI >= 0.3.4x) the multiplicative step is an adapter that scales the weight *as
accumulated so far*, exact after LoRA and evaluated per layer call under dynamic VRAM; on older hosts
it is a precomputed "diff" W0 * s ΔW, exact only when nothing is patched before it.
"""
import torch

import comfy.model_management

from ..e4t.offsets import weight_change

try:
    from comfy.weight_adapter import WeightAdapterBase
except ImportError:  # ComfyUI before weight adapters (e.g. the March 2024 copy)
    WeightAdapterBase = None

PREFIX = "diffusion_model."

if WeightAdapterBase is not None:
    class E4TOffsetAdapter(WeightAdapterBase):
        """W -> W + function(strength * W * ΔW), out of place, in the intermediate dtype.

        Constructed as the core rebuilds adapters, `(loaded_keys, weights)` with every tensor in `weights`.
        """
        name = "e4t"

        def __init__(self, loaded_keys, weights):
            self.loaded_keys = loaded_keys
            self.weights = weights

        def calculate_shape(self, key):
            return None

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            delta = comfy.model_management.cast_to_device(self.weights[0], weight.device, intermediate_dtype)
            change = weight_change(weight.to(intermediate_dtype), delta, strength=strength)
            return (weight.to(intermediate_dtype) + function(change.to(intermediate_dtype))).to(weight.dtype)


def unpatched(model, key, state_dict):
    """The base weight without any patch: clones share one module, and a loaded clone's patches stay
    written into it (originals in the shared `backup`) until another clone loads."""
    backup = getattr(model, "backup", {}).get(key)
    return state_dict[key] if backup is None else getattr(backup, "weight", backup)


def add_e4t_patches(model, deltas: dict, unet_delta: dict, strength: float) -> None:
    """Patch a MODEL clone: tuned U-Net delta (diff) then the offsets, both scaled by `strength`."""
    base = model.model_state_dict()     # shapes checked by e4t.validate.e4t_fits before anything is patched
    if WeightAdapterBase is not None:
        if unet_delta:
            model.add_patches({PREFIX + k: (v,) for k, v in unet_delta.items()}, strength)
        model.add_patches({PREFIX + k: E4TOffsetAdapter({PREFIX + k}, (d,)) for k, d in deltas.items()}, strength)
        return
    # the whole change of an offset key as one diff (D's part included); D alone where no offset acts
    model.add_patches({PREFIX + k: (v,) for k, v in unet_delta.items() if k not in deltas}, strength)
    patches = {}
    for k, d in deltas.items():
        w = unpatched(model, PREFIX + k, base)
        patches[PREFIX + k] = (weight_change(w, d, unet_delta.get(k), strength).to(w.dtype),)
    model.add_patches(patches, 1.0)
