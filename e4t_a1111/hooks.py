"""E4T weights on a live U-Net as forward hooks: no tensor the host owns is ever written.

For a weight W as its module holds it at call time (the built-in Lora extension edits weights in
place, so W already carries any active LoRA), a concept with tuned U-Net delta D and offsets ΔW at
strength s computes with

    W' = (W + s·D) ⊙ (1 + s·ΔW)        (ΔW on attention q/k/v only; D on every tuned weight)

the engine's rule (`e4t.offsets.weight_change`), as the ComfyUI pack applies it. Linear and Conv2d
layers are linear in their weight, so their hook adds layer(x; W' − W, s·D_bias) to the output;
GroupNorm and LayerNorm recompute the output with W' and b + s·D_bias. Removing the hooks leaves
every module exactly as it was.

What a hook adds is computed once per module and weight version, not on every call: s·D does not
depend on W, and (W + s·D)(1 + s·ΔW) − W is recomputed only when W's identity or in-place version
changes (Lora writes its weights in place on a module's first call of a job). Kept on the device of
the hooks' storage only: in low-VRAM mode (storage on the CPU) nothing is kept on the GPU.

Torch and the engine only: no webui import, so it is testable on any CompVis-layout U-Net.
"""
import torch
import torch.nn.functional as F
from torch import nn

from e4t.offsets import weight_change

LINEAR_LIKE = (nn.Linear, nn.Conv2d)
NORMS = (nn.GroupNorm, nn.LayerNorm)


class WeightHooks:
    """Forward hooks carrying one concept's offsets and tuned delta on the modules of `unet`.

    offsets: {CompVis weight name: ΔW (out, in)}; unet_delta: {CompVis parameter name: D};
    storage: device for the tensors the hooks keep (they follow the input's device at call time).
    """

    def __init__(self, unet: nn.Module, offsets: dict, unet_delta: dict, strength: float, storage=None):
        self.unet, self.strength, self.handles = unet, float(strength), []
        parts = {}
        for key, delta in unet_delta.items():
            owner, _, kind = key.rpartition(".")
            parts.setdefault(owner, {})[kind] = delta
        for key, delta in offsets.items():
            owner, _, kind = key.rpartition(".")
            if kind != "weight":
                raise ValueError(f"E4T offset {key!r}: offsets modulate weights only")
            parts.setdefault(owner, {})["offset"] = delta
        self.parts = {}
        for owner, found in sorted(parts.items()):
            module = self._module(owner)
            for kind, delta in found.items():
                param = getattr(module, "weight" if kind == "offset" else kind, None)
                if not isinstance(param, torch.Tensor):
                    raise ValueError(f"E4T weights do not fit this model: layer {owner!r} has no {kind!r}")
                if tuple(delta.shape) != tuple(param.shape):
                    raise ValueError(f"E4T weights do not fit this model: {owner}.{kind} has shape "
                                     f"{list(param.shape)}, the E4T file has {list(delta.shape)}. Is this an "
                                     f"SD1.x model?")
            if "offset" in found and not isinstance(module, nn.Linear):
                raise ValueError(f"E4T offset on {owner!r}: expected a Linear layer, found {type(module).__name__}")
            if not isinstance(module, LINEAR_LIKE + NORMS):
                raise ValueError(f"E4T tuned weights on {owner!r}: layers of type {type(module).__name__} are not "
                                 f"supported (Linear, Conv2d, GroupNorm, LayerNorm are)")
            store = {k: v.detach().to(storage) if storage is not None else v.detach() for k, v in found.items()}
            self.parts[owner] = (module, store)

    def _module(self, owner):
        try:
            return self.unet.get_submodule(owner)
        except AttributeError:
            raise ValueError(f"E4T weights do not fit this model: it has no layer {owner!r}. "
                             f"Is this an SD1.x model?") from None

    def apply(self):
        """Register the hooks (idempotent). With strength 0 nothing is registered."""
        self.remove()
        if self.strength == 0:
            return self
        for module, store in self.parts.values():
            hook = _norm_hook if isinstance(module, NORMS) else _linear_hook
            self.handles.append(module.register_forward_hook(_bind(hook, store, self.strength)))
        return self

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @property
    def active(self):
        return bool(self.handles)


def _bind(hook, store, strength):
    cache = {}                                     # per module: {"key": ..., "value": ...}, the latest only

    def bound(module, args, out):
        return hook(module, args, out, store, strength, cache)
    return bound


def _weight_key(module, x: torch.Tensor, store: dict):
    """What the hook's precomputed tensors depend on, or None where they must not be kept."""
    held = next(iter(store.values()))
    if held.device != x.device:                  # low VRAM: the store stays on the CPU, keep nothing on the GPU
        return None
    if "offset" not in store and not isinstance(module, NORMS):
        return (x.device, x.dtype)               # s·D and s·D_bias only: W does not enter
    held_now = [module.weight] + ([module.bias] if isinstance(module, NORMS) and module.bias is not None else [])
    try:
        versions = tuple((id(t), t.data_ptr(), t._version) for t in held_now)
    except RuntimeError:                         # inference tensors keep no version counter: never cache
        return None
    return (x.device, x.dtype) + versions


def _cached(cache: dict, key, compute):
    if key is None:
        return compute()
    if cache.get("key") != key:
        cache["key"], cache["value"] = key, compute()
    return cache["value"]


def _on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.device == like.device else t.to(like.device, non_blocking=True)


def change_of(weight: torch.Tensor, store: dict, strength: float) -> torch.Tensor | None:
    """W' − W (fp32) for the weight as the module holds it now: the engine's rule, `e4t.offsets.weight_change`."""
    return weight_change(weight.detach(), store.get("offset"), store.get("weight"), strength)


def _linear_hook(module, args, out, store, strength, cache):
    x = args[0]
    change, bias = _cached(cache, _weight_key(module, x, store), lambda: _linear_parts(module, x, store, strength))
    if change is None:                       # a tuned bias only
        return out + (bias if isinstance(module, nn.Linear) else bias[:, None, None]).to(out.dtype)
    if isinstance(module, nn.Linear):
        extra = F.linear(x, change, bias)
    else:
        extra = module._conv_forward(x, change, bias)
    return out + extra.to(out.dtype)


def _linear_parts(module, x, store, strength):
    """(W' − W, s·D_bias) in the input's dtype, either None."""
    change = change_of(module.weight, store, strength)
    bias = store.get("bias")
    bias = None if bias is None else strength * _on(bias, x).to(x.dtype)
    return (None if change is None else change.to(x.dtype)), bias


def _norm_parts(module, x, store, strength):
    """(W', b') in fp32."""
    change = change_of(module.weight, store, strength)
    weight = module.weight.float() + (0 if change is None else change)
    bias = module.bias.float() if module.bias is not None else torch.zeros_like(weight)
    if "bias" in store:
        bias = bias + strength * _on(store["bias"], x).float()
    return weight, bias


def _norm_hook(module, args, out, store, strength, cache):
    x = args[0].float()
    weight, bias = _cached(cache, _weight_key(module, x, store), lambda: _norm_parts(module, x, store, strength))
    if isinstance(module, nn.GroupNorm):
        y = F.group_norm(x, module.num_groups, weight, bias, module.eps)
    else:
        y = F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
    return y.to(out.dtype)
