"""What tuning and pretraining share: the U-Net weights a step runs with (fp32 master copies, or deltas added to the
host's frozen weights block by block), optional gradient checkpointing, and E4T's objective (paper eq. 3) for one
optimiser step. Everything runs on a structural clone of the host's U-Net (new module objects sharing the host's
tensors), so the host's own modules are never touched, not even for the duration of a step."""
import copy
import types
from contextlib import contextmanager
from dataclasses import dataclass

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


_IN_PLACE = {}


def residuals_in_place(unet: nn.Module) -> bool:
    """Whether the U-Net's transformer blocks add residuals in place after a LayerNorm read their input (ComfyUI
    before 2025), which autograd refuses. Found by behaviour, not by version or source text: a small fresh block
    of the same class (the CompVis signature dim, n_heads, d_head, dropout, context_dim, gated_ff, checkpoint that
    SD1 hosts keep) runs forward and backward once on the U-Net's device and dtype; the answer is kept per class."""
    block = next((m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"), None)
    if block is None:
        return False
    kind = type(block)
    if kind not in _IN_PLACE:
        ref = next(block.parameters())
        device, dtype = ref.device, ref.dtype if ref.dtype.is_floating_point and ref.dtype.itemsize >= 2 else torch.float32
        if ref.is_meta or type(ref).__name__ == "FakeTensor":      # a memory estimate's U-Net: probe on the CPU
            device, dtype = torch.device("cpu"), torch.float32
        with torch.inference_mode(False), torch.enable_grad():
            probe = kind(8, 1, 8, 0.0, 8, True, False).to(device, dtype)
            for p in probe.parameters():
                nn.init.normal_(p, std=0.1)          # host classes may leave weights uninitialised
            x = torch.randn(1, 2, 8, device=device, dtype=dtype, requires_grad=True)
            try:
                probe(x * 1, torch.randn(1, 2, 8, device=device, dtype=dtype)).float().sum().backward()
                _IN_PLACE[kind] = False
            except RuntimeError as err:
                if "inplace" not in str(err):
                    raise
                _IN_PLACE[kind] = True
    return _IN_PLACE[kind]


@contextmanager
def training_mode(unet: nn.Module, clone_norm_inputs: bool | None = None):
    """Autograd on even inside a host's inference mode. clone_norm_inputs: for U-Nets whose transformer
    blocks add residuals in place after a LayerNorm read its input (ComfyUI before 2025), which autograd
    refuses; each LayerNorm then reads a copy. None: `residuals_in_place` decides. The hooks are removed afterwards."""
    if clone_norm_inputs is None:
        clone_norm_inputs = residuals_in_place(unet)
    hooks = [m.register_forward_pre_hook(lambda mod, args: (args[0].clone(), *args[1:]))
             for m in unet.modules() if isinstance(m, nn.LayerNorm)] if clone_norm_inputs else []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for h in hooks:
            h.remove()


def structural_clone(module: nn.Module) -> nn.Module:
    """New module objects with the same parameters, buffers and attributes (nothing is copied but the module tree
    and its dicts): substitutions, per-block wrappers and hooks installed on the clone never reach the host's
    modules. Methods bound to an original module instance (per-instance patches) are rebound to its clone."""
    clone = copy.copy(module)
    clone.__dict__ = {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    for k, v in clone.__dict__.items():
        if isinstance(v, types.MethodType) and v.__self__ is module:
            clone.__dict__[k] = types.MethodType(v.__func__, clone)
    clone._modules = {k: None if m is None else structural_clone(m) for k, m in module._modules.items()}
    return clone


def _units(unet: nn.Module) -> dict:
    """{name prefix: layer} of the U-Net's checkpointing and substitution units: every layer of every input,
    middle and output block (ComfyUI's U-Net calls the layers of a block directly, never the block's forward)."""
    blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)] + [("middle_block", unet.middle_block)]
    blocks += [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
    return {f"{prefix}.{j}": layer for prefix, block in blocks for j, layer in block.named_children()}


class UNetWeights:
    """The U-Net weights of a training step. Frozen names run on the host's tensors. Trained names:

    - "master": fp32 trainable copies of the host's weights (16 bytes per parameter with AdamW and its gradients).
      `flat`: held in three flat tensors (the weights merged with offsets; those of linear and conv layers; the
      rest, e.g. norms), of which the U-Net's tensors are views made once per step (`begin`). So a step casts the
      layers' weights for autocast in one kernel (`cast`), not one per weight, backward gathers their gradients in
      one, and the optimizer and gradient clipping see three tensors, not hundreds; each weight's maths is
      unchanged. That costs memory wherever a step is not one whole forward and backward (a flat gradient is formed
      whole at the end of backward, the cast is kept across micro-batches, recomputed blocks do not recast):
      without `flat` each weight is a leaf of its own, cast by autocast where it is used;
    - "delta": a bf16 delta D per weight, trained from zero, the weight being W0 + D with W0 the host's frozen
      tensor; W0 + D is formed inside each block as it runs (and again when a checkpointed block is recomputed), so
      no full-size trained copy of the U-Net exists. Deltas keep what bf16 master weights would lose: a step of 1e-5
      on a weight of 0.05 is below bf16's resolution of the weight, not of the delta.

    `compute`: the dtype weights enter the U-Net in (None: as stored, autocast casts them). `cast`: the autocast
    dtype, which linear and conv layers compute in (their master weights are cast to it once per step).
    `merged`: names used only through `stacked` (merged with the offsets, in fp32)."""

    def __init__(self, unet: nn.Module, trained: set, kind: str = "master", compute=None, cast=None,
                 merged=frozenset(), flat: bool = True):
        if kind not in ("master", "delta"):
            raise ValueError(f"unknown unet_weights {kind!r}: use 'master' or 'delta'")
        self.kind, self.compute, self.trained = kind, compute, sorted(trained)
        self.base = {n: p.detach() for n, p in unet.named_parameters()}
        self.tensors, self.deltas, self.segments = {}, {}, []
        if kind == "master":
            self.tensors = {n: self._frozen(p) for n, p in self.base.items() if n not in trained}
            if not flat:                                    # one leaf per weight, cast by autocast where used
                self.tensors.update((n, self.base[n].clone().float().requires_grad_()) for n in self.trained)
                return
            layers = {n for n in self.trained if n not in merged and isinstance(
                unet.get_submodule(n.rpartition(".")[0]), (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
            for names, dtype in (([n for n in self.trained if n in merged], None),
                                 ([n for n in self.trained if n in layers], cast),
                                 ([n for n in self.trained if n not in merged and n not in layers], None)):
                if names:
                    self.segments.append((names, self._flat(names), dtype))
        else:
            self.deltas = {n: torch.zeros_like(self.base[n], dtype=torch.bfloat16).requires_grad_() for n in trained}

    def _flat(self, names: list) -> torch.Tensor:
        """One fp32 leaf holding fp32 copies of the named weights, end to end (filled in place: no second copy)."""
        flat = torch.empty(sum(self.base[n].numel() for n in names), dtype=torch.float32, device=self.base[names[0]].device)
        with torch.no_grad():
            for n, part in zip(names, flat.split([self.base[n].numel() for n in names])):
                part.copy_(self.base[n].reshape(-1))
        return flat.requires_grad_()

    def begin(self):
        """This step's tensors (master copies): views of each flat tensor in one split, the layers' cast once.
        Call before each forward whose backward is separate (each micro-batch); the trained names have no tensor
        before the first call."""
        for names, flat, dtype in self.segments:
            source = flat if dtype is None or dtype == flat.dtype else flat.to(dtype)
            parts = source.split([self.base[n].numel() for n in names])
            self.tensors.update((n, part.view(self.base[n].shape)) for n, part in zip(names, parts))

    def _frozen(self, p):
        if self.compute is not None and p.dtype != self.compute:
            return p.to(self.compute)
        return p.clone() if p.is_inference() else p      # autograd cannot save inference tensors

    def trainable(self) -> list:
        if self.kind == "delta":
            return [self.deltas[n] for n in self.trained]
        return [flat for _, flat, _ in self.segments] or [self.tensors[n] for n in self.trained]

    def bases(self) -> dict:
        """{delta tensor: its frozen weight}, for the optimizer's weight decay of W0 + D."""
        return {d: self.base[n] for n, d in self.deltas.items()}

    def __call__(self, name: str) -> torch.Tensor:
        """The tensor the U-Net runs with for parameter `name` (inside the block that owns it)."""
        if self.kind == "master":
            return self.tensors[name]
        d = self.deltas.get(name)
        if d is None:
            return self._frozen(self.base[name])
        w = self.base[name]
        dtype = self.compute or w.dtype
        return w.to(dtype) + d.to(dtype)

    def stacked(self, names: list) -> torch.Tensor:
        """fp32 weights of one shape, differentiable in what trains, stacked (g, out, in): for merging with ΔW once
        per step, in two or three kernels, not per weight."""
        if self.kind == "master":
            return torch.stack([self.tensors[n] for n in names]).float()
        full = torch.stack([self.base[n] for n in names]).float()
        if not any(n in self.deltas for n in names):
            return full
        return full + torch.stack([self.deltas[n] if n in self.deltas else torch.zeros_like(self.base[n], dtype=torch.bfloat16)
                                   for n in names]).float()

    def delta(self) -> dict:
        """{name: W_tuned - W0} for every trained weight (fp32 for master copies, bf16 for deltas)."""
        if self.kind == "delta":
            return {n: self.deltas[n].detach() for n in self.trained}
        if not self.segments:                          # one leaf per weight
            return {n: self.tensors[n].detach() - self.base[n].float() for n in self.trained}
        return {n: part.view(self.base[n].shape) - self.base[n].float() for names, flat, _ in self.segments
                for n, part in zip(names, flat.detach().split([self.base[n].numel() for n in names]))}


@contextmanager
def parametrized(unet: nn.Module, weight, extra: dict, checkpointing: bool, chunk: int = 0):
    """Run `unet` (a structural clone) with `weight(name)` for every parameter, `extra` ({name: tensor}) taking
    precedence. Each layer of the U-Net's blocks gets its tensors when it runs, inside its gradient checkpoint when
    `checkpointing` (then what a layer forms, W0 + D included, is recomputed in backward instead of kept).
    chunk: with checkpointing, a layer runs (and is recomputed) `chunk` samples at a time (0: the whole batch)."""
    blocks = _units(unet)
    owned, outer = {p: [] for p in blocks}, []
    for n, _ in unet.named_parameters():
        parts = n.split(".")
        unit = next((".".join(parts[:k]) for k in (2, 3) if ".".join(parts[:k]) in blocks), None)
        (owned[unit] if unit else outer).append(n)

    def get(n):
        return extra[n] if n in extra else weight(n)

    own = {prefix: block.__dict__.get("forward") for prefix, block in blocks.items()}   # per-instance patches

    def wrap(prefix, block):
        forward = own[prefix] or type(block).forward.__get__(block)
        local = [(n, n[len(prefix) + 1:]) for n in owned[prefix]]

        def run(*args, **kwargs):
            with substituted(block, {short: get(n) for n, short in local}):
                return forward(*args, **kwargs)
        if not checkpointing:
            return run
        if not chunk:
            return lambda *args, **kwargs: checkpoint(run, *args, use_reentrant=False, **kwargs)
        return lambda *args, **kwargs: _in_chunks(lambda *a, **k: checkpoint(run, *a, use_reentrant=False, **k),
                                                  chunk, args, kwargs)

    try:
        for prefix, block in blocks.items():
            block.forward = wrap(prefix, block)
        with substituted(unet, {n: get(n) for n in outer}):
            yield unet
    finally:
        for prefix, block in blocks.items():
            if own[prefix] is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own[prefix]


def _in_chunks(layer, chunk: int, args: tuple, kwargs: dict):
    """layer(*args, **kwargs) for `chunk` samples at a time, outputs concatenated. Every layer of an SD U-Net works
    on each sample alone (group norms and attention are per sample), so this is the same computation; what a
    checkpointed layer holds while it is recomputed in backward shrinks by batch / chunk. Tensor arguments whose
    first dimension is the batch are split; the rest (contexts of batch 1, options) are passed whole."""
    batch = args[0].shape[0]
    if batch <= chunk:
        return layer(*args, **kwargs)

    def part(a, i):
        return a[i:i + chunk] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch else a
    return torch.cat([layer(*(part(a, i) for a in args), **{k: part(v, i) for k, v in kwargs.items()})
                      for i in range(0, batch, chunk)])


HOLD_MIN_BYTES = 1 << 20


def offloads(device: torch.device) -> bool:
    """Whether activations kept for backward can move to CPU memory: on a GPU (elsewhere memory is one pool)."""
    return device.type == "cuda"


def hold_on_cpu(t: torch.Tensor) -> torch.Tensor:
    """A pinned CPU copy of `t`, copied without waiting (later kernels on the stream run after the copy)."""
    held = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return held.copy_(t, non_blocking=True)


def back_from_cpu(device: torch.device, held: torch.Tensor) -> torch.Tensor:
    return held.to(device, non_blocking=True)


@contextmanager
def activations_on_cpu(enabled: bool):
    """Activations autograd keeps for backward (with checkpointing: each layer's input) are held in CPU memory and
    come back to the device when backward needs them. Leaves (weights, frozen or trained) and small tensors stay."""
    if not enabled:
        yield
        return

    def pack(t):
        if t.grad_fn is None or not offloads(t.device) or t.numel() * t.element_size() < HOLD_MIN_BYTES:
            return t
        return t.device, hold_on_cpu(t)

    def unpack(saved):
        return saved if isinstance(saved, torch.Tensor) else back_from_cpu(*saved)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


MERGE_CHUNK = 1 << 23        # elements of W' merged at once: SD1.5's largest shape (24 × 1280²) in 5 pieces


@dataclass
class Objective:
    """Diffusion loss + embedding regulariser for one optimiser step, gradients into `encoder` (heads),
    `offsets` and what `weights` trains. ΔW is formed once per step: the merged weights become leaves for the
    U-Net passes, and their gradient flows back to the offsets (and trained weights) once."""
    unet: nn.Module              # a structural clone of the host's U-Net
    encoder: nn.Module
    offsets: nn.Module
    weights: UNetWeights
    text_encode: object          # (prompts, words (b, d)) -> (b, 77, ctx), differentiable in words
    e_domain: torch.Tensor
    empty_context: torch.Tensor
    alphas_cumprod: torch.Tensor
    scale: float                 # these three from the caller's config (TuneConfig, PretrainConfig): no second default
    prediction: str
    reg_lambda: float
    checkpointing: bool = False
    autocast_dtype: torch.dtype | None = None
    chunk: int = 0               # samples per recomputed layer (see `parametrized`)
    offload: bool = False        # activations kept for backward held in CPU memory (see `activations_on_cpu`)

    def backward(self, tokens, x0, noise, t, prompts, masks=None, accumulation: int = 1, loss_scale: float = 1.0):
        """tokens (b|1, n, d) image features; x0, noise (b, 4, h, w); t (b,); masks (b, 1, h, w) or None.
        Accumulates gradients (of loss × loss_scale) over `accumulation` micro-batches with the full-batch loss;
        returns the loss."""
        from .encoder import ImageFeatures

        acp, device = self.alphas_cumprod, x0.device
        fp32 = self.autocast_dtype is None            # no autocast: everything in fp32 (weights are fp32 copies)
        dtype = torch.float32 if fp32 else unet_dtype(self.unet)
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype, enabled=not fp32)
        leaf_dtype = torch.float32 if self.weights.kind == "master" else (self.weights.compute or torch.float32)

        self.weights.begin()

        def merged_weights():
            """[(targets, their W' stacked (g, out, in))], a few kernels per weight shape (or per MERGE_CHUNK
            elements of one: the merge's fp32 temporaries of one piece are alive at once)."""
            out = []
            for keys, delta in self.offsets.grouped():
                per = max(1, MERGE_CHUNK // delta[0].numel())
                for i, part in enumerate(delta.split(per)):
                    names = keys[i * per:(i + 1) * per]
                    out.append((names, merge(self.weights.stacked(names), part).to(leaf_dtype)))
            return out
        # Low-VRAM: what the merge keeps for backward (one weight-sized fp32 tensor per target, 0.26 GiB
        # for SD1.5) is recomputed for the final backward instead of being kept through the step.
        merged = checkpoint(merged_weights, use_reentrant=False) if self.checkpointing else merged_weights()
        # One leaf per target, views of its group (autocast casts a leaf once per step, however often it is used).
        leaves = [[w.requires_grad_() for w in m.detach().unbind()] for _, m in merged]
        extra = {k: w for (keys, _), ws in zip(merged, leaves) for k, w in zip(keys, ws)}
        # The diffusion term is a mean: each micro-batch carries its share; the regulariser is a sum over the
        # batch: each micro-batch adds its own part.
        total = 0.0
        for i, mb in enumerate(torch.arange(x0.shape[0]).split(x0.shape[0] // accumulation)):
            if i:
                self.weights.begin()                  # fresh views: each micro-batch's backward is its own
            feats = ImageFeatures(tokens=tokens if tokens.shape[0] == 1 else tokens[mb])
            xt = noisy(x0[mb], noise[mb], acp[t[mb]])
            with parametrized(self.unet, self.weights, extra, self.checkpointing, self.chunk), \
                    computing_in(self.unet, torch.float32 if fp32 else None), \
                    activations_on_cpu(self.offload and offloads(device)):
                with autocast:
                    e = self.encoder(feats, unet_features(self.unet, xt, t[mb], self.empty_context, dtype))
                    w = placeholder_word(self.e_domain, e.float(), self.scale)
                    context = self.text_encode([prompts[i] for i in mb], w).to(dtype)   # hosts may run CLIP in fp16
                    pred = self.unet(xt, timesteps=t[mb], context=context)
                loss = diffusion_loss(pred, target(self.prediction, x0[mb], noise[mb], acp[t[mb]]),
                                      None if masks is None else masks[mb])
                loss = loss / accumulation + self.reg_lambda * regularizer(w)
                (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            total += float(loss.detach())
        grads = [torch.stack([w.grad if w.grad is not None else torch.zeros_like(w) for w in ws]) for ws in leaves]
        torch.autograd.backward([m for _, m in merged], grads)
        return total
