"""E4T weights on a live U-Net, applied per call: no tensor the host owns is ever written.

For a weight W as its module holds it at call time (the built-in Lora extension edits weights in
place, on a module's first call of a job), a concept with tuned U-Net delta D and offsets ΔW at
strength s computes with

    W' = (W + s·D) ⊙ (1 + s·ΔW)        (ΔW on attention q/k/v only; D on every tuned weight)

the engine's rule (`e4t.offsets.weight_change`), as the ComfyUI pack applies it.

Each changed module gets a forward of its own for the job (an instance attribute, removed afterwards;
hooks other code registers on the module still run around it, and see the real input and output). It
first calls the module's own forward on an empty batch, so whatever that forward does to the weights
(Lora's in-place edits) still happens, then runs the layer once with W' and b + s·D_bias: the cost of
the plain layer. Linear and Conv2d layers check on their first call that the module's own forward is the
plain layer on its weights (it is not under Lora's "functional" option, which adds LoRA from the input,
or another extension's patch); where it is not, the host's output is kept and layer(x; W' − W, s·D_bias)
added to it (two products). GroupNorm and LayerNorm always compute
with W' and b'.

W' is computed once per module and weight version, not on every call: again only when W's (or its bias's)
identity or in-place version changes; on a CPU all layers' W' share one buffer (`_Arena`). Kept on the device
of the store only: in low-VRAM mode (store on the CPU) nothing is kept on the GPU.

Torch and the engine only: no webui import, so it is testable on any CompVis-layout U-Net.
"""
import torch
import torch.nn.functional as F
from torch import nn

from e4t.offsets import weight_change

LINEAR_LIKE = (nn.Linear, nn.Conv2d)
NORMS = (nn.GroupNorm, nn.LayerNorm)
MERGEABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class WeightHooks:
    """One concept's offsets and tuned delta on the modules of `unet`, while applied.

    offsets: {CompVis weight name: ΔW (out, in)}; unet_delta: {CompVis parameter name: D};
    storage: device for the tensors kept (they follow the input's device at call time).
    """

    def __init__(self, unet: nn.Module, offsets: dict, unet_delta: dict, strength: float, storage=None):
        self.unet, self.strength, self.layers = unet, float(strength), []
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
        """Give every changed module its forward (idempotent). With strength 0 nothing changes."""
        self.remove()
        if self.strength == 0:
            return self
        arena = _Arena([module for module, _ in self.parts.values() if isinstance(module, LINEAR_LIKE)])
        self.layers = [_Layer(module, store, self.strength, arena) for module, store in self.parts.values()]
        return self

    def remove(self):
        for layer in reversed(self.layers):
            layer.remove()
        self.layers = []

    @property
    def active(self):
        return bool(self.layers)


class _Layer:
    """The forward of one changed module while the concept is applied."""

    def __init__(self, module: nn.Module, store: dict, strength: float, arena: "_Arena"):
        self.module, self.store, self.strength, self.arena = module, store, strength, arena
        self.norm = isinstance(module, NORMS)
        self.plain = None                 # is the module's own forward the plain layer? (first call of a Linear/Conv2d)
        self.on, self.cache = True, {}    # {"key": weights' version, "value": what was derived from them}
        self.before = module.__dict__.get("forward")       # another instance-level forward, set before ours
        module.forward = self

    def remove(self):
        if self.module.__dict__.get("forward") is self:
            if self.before is None:
                del self.module.forward
            else:
                self.module.forward = self.before
        self.on = False                   # wrapped by someone after us: from now on only their forward's host

    def host(self):
        return self.before if self.before is not None else type(self.module).forward.__get__(self.module)

    def __call__(self, x, *args, **kwargs):
        host, module = self.host(), self.module
        if not self.on or args or kwargs:
            return host(x, *args, **kwargs)
        if self.norm:
            out = host(x[:0])                                   # the module's own forward: Lora's edits happen
            weight, bias = self._kept(x, self._norm_parts)
            return _norm(module, x.float(), weight, bias).to(out.dtype)
        if self.plain:
            out = host(x[:0])
            weight, bias = self._kept(x, self._merged_parts)
            return _layer(module, x, weight, bias).to(out.dtype)
        out = host(x)
        if self.plain is None:
            self.plain = _is_plain(module, x, out)
        if self.plain:                                          # the first call: from the next on, W' is kept
            change, bias = _cast(self._change_parts(x), x.dtype)
        else:
            change, bias = self._kept(x, lambda x: _cast(self._change_parts(x), x.dtype))
        if change is None:                                      # a tuned bias only
            return out + (bias if isinstance(module, nn.Linear) else bias[:, None, None]).to(out.dtype)
        return out + _layer(module, x, change, bias).to(out.dtype)

    def _kept(self, x, make):
        """`make(x)`, kept while the module's weights keep their identity and version (the latest only)."""
        key = _weight_key(self.module, x, self.store)
        if key is None:
            return make(x)
        if self.cache.get("key") != key:
            self.cache = {"key": key, "value": make(x)}
        return self.cache["value"]

    def _change_parts(self, x):
        """(W' − W, s·D_bias) in fp32, either None."""
        bias = self.store.get("bias")
        return (change_of(self.module.weight, self.store, self.strength),
                None if bias is None else self.strength * _on(bias, x).float())

    def _merged_parts(self, x):
        """(W', b') in the weight's dtype."""
        change, added = self._change_parts(x)
        weight, bias = self.module.weight, self.module.bias
        if change is not None:
            weight = self.arena.hold(weight, weight.float() + change)
        if added is not None:
            bias = self.arena.hold(bias, bias.float() + added)
        return weight, bias

    def _norm_parts(self, x):
        """(W', b') in fp32."""
        change, added = self._change_parts(x)
        module = self.module
        weight = module.weight.float() + (0 if change is None else change)
        bias = module.bias.float() if module.bias is not None else torch.zeros_like(weight)
        return weight, bias if added is None else bias + added


class _Arena:
    """Every Linear/Conv2d layer's W' and b' in one flat CPU buffer per dtype. Kept as hundreds of separate tensors,
    they changed how glibc's malloc reuses memory for the U-Net's activations: in the webui on a CPU, a call with a
    concept changing every weight page-faulted 2.4× as much and took 1.30–1.45× as long as a plain call; with one
    buffer, as many faults as a plain call and 1.07× its time (BENCHMARKS.md). GPU memory comes from torch's caching allocator: tensors stay separate there."""

    def __init__(self, modules: list):
        self.params = [p for m in modules for p in (m.weight, m.bias) if p is not None]
        self.buffers = {}                              # dtype -> (flat buffer, {id(parameter): offset})

    def hold(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """`value` in `param`'s dtype, in `param`'s place in the buffer where it has one."""
        if param.device.type != "cpu":
            return value.to(param.dtype)
        if param.dtype not in self.buffers:
            offsets, total = {}, 0
            for p in self.params:
                if p.device.type == "cpu" and p.dtype == param.dtype:
                    offsets[id(p)], total = total, total + p.numel()
            self.buffers[param.dtype] = torch.empty(total, dtype=param.dtype), offsets
        flat, offsets = self.buffers[param.dtype]
        start = offsets.get(id(param))
        if start is None:
            return value.to(param.dtype)
        return flat[start:start + param.numel()].view(param.shape).copy_(value)


def _weight_key(module, x: torch.Tensor, store: dict):
    """What the tensors derived from a module's weights depend on, or None where they must not be kept."""
    held = next(iter(store.values()))
    if held.device != x.device:                  # low VRAM: the store stays on the CPU, keep nothing on the GPU
        return None
    held_now = [module.weight] + ([module.bias] if module.bias is not None else [])
    try:
        versions = tuple((id(t), t.data_ptr(), t._version) for t in held_now)
    except RuntimeError:                         # inference tensors keep no version counter: never keep
        return None
    return (x.device, x.dtype) + versions


def _on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.device == like.device else t.to(like.device, non_blocking=True)


def change_of(weight: torch.Tensor, store: dict, strength: float) -> torch.Tensor | None:
    """W' − W (fp32) for the weight as the module holds it now: the engine's rule, `e4t.offsets.weight_change`."""
    return weight_change(weight.detach(), store.get("offset"), store.get("weight"), strength)


def _cast(tensors, dtype):
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _layer(module, x, weight, bias):
    """The plain Linear / Conv2d computation with the given weights."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return module._conv_forward(x, weight, bias)


def _is_plain(module, x, out) -> bool:
    """Whether the module's forward gave exactly the plain layer on its (possibly just edited) weights, so that
    running the layer with W' replaces it."""
    if module.weight.dtype not in MERGEABLE:
        return False
    try:
        return torch.equal(out, _layer(module, x, module.weight, module.bias))
    except (RuntimeError, TypeError):
        return False


def _norm(module, x, weight, bias):
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, weight, bias, module.eps)
    return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
