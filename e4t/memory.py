"""Peak GPU memory of a tune, estimated on the CPU at full size without a GPU and without the models' memory.

The real `tune` runs for a couple of steps on fake tensors (shapes and dtypes, no data: torch's
FakeTensorMode) while `LiveBytes` counts every storage it creates as the CUDA caching allocator counts it
(a multiple of 512 bytes) until the storage dies. Fake CUDA tensors cannot run backward without a CUDA
driver, so the tune runs on fake CPU tensors under CPU autocast, with `CudaAutocastPolicy` making the ops
whose dtype the two autocasts treat differently (norms, upsampling) follow CUDA's rules. What is
emulated and what is not: README "Memory estimate". Needs torch >= 2.2 (fake tensors through the CPU
flash-attention kernel; before it the CPU attention materialises every score matrix).
"""
import copy
import itertools
import os
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ALLOCATION = 512          # the CUDA caching allocator hands out multiples of 512 bytes
MIN_TORCH = (2, 2)
CATEGORIES = ("resident", "trainable", "gradients", "optimizer", "kept", "activations")
DESCRIPTIONS = {"resident": "on the device before the tune (host's U-Net and text weights, features)",
                "trainable": "trainable copies (heads, offsets, U-Net masters)",
                "gradients": "gradients of the trainable copies",
                "optimizer": "optimizer state",
                "kept": "other tensors the tune keeps across steps (frozen copies, latents)",
                "activations": "activations and temporaries at the peak"}


def rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOCATION) * ALLOCATION


def supported() -> str | None:
    """None where this torch can estimate; else why not, in words a user can act on."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        return (f"the memory estimate needs torch >= {'.'.join(map(str, MIN_TORCH))} (this is {torch.__version__}): "
                "older CPU attention kernels materialise every attention matrix on fake tensors")
    return None


class _Entry:
    __slots__ = ("nbytes", "label", "ref")

    def __init__(self, nbytes, label):
        self.nbytes, self.label, self.ref = nbytes, label, None


class LiveBytes(TorchDispatchMode):
    """Counts the storages of every tensor an operation returns while active, until each storage dies;
    `peak` is the most ever alive at once and `at_peak` what was alive then. Scalar reads of fake tensors
    (`.item()`, `if t:`) answer a stand-in value (`_stand_in`), so data-dependent control flow
    takes one path."""

    def __init__(self, fake_mode=None):
        super().__init__()
        # torch >= 2.5 memoises every fake tensor weakly, and nn.Module.to then refuses to swap the
        # parameters of a module (the tune moves its copies of heads and offsets): the memo, used only to
        # map real tensors to fakes, is emptied after each operation.
        self._memo = getattr(getattr(fake_mode, "fake_tensor_converter", None), "tensor_memo", None)
        self.live = {}           # storage key -> _Entry
        self.now = self.peak = 0
        self.at_peak = []        # entries alive at the peak (a snapshot, refreshed every SNAPSHOT bytes)
        self._snapshot_at = -1
        self.paused = False

    SNAPSHOT = 1 << 20

    def add(self, tensor: torch.Tensor, label=None):
        """Count `tensor`'s storage (once, however many views share it); label it if given."""
        st = tensor.untyped_storage()
        key = st._cdata
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = _Entry(rounded(st.nbytes()), label)
            entry.ref = weakref.ref(st, lambda _, key=key, e=entry: self._free(key, e))
            self.now += entry.nbytes
            if self.now > self.peak:
                self.peak = self.now
                if self.peak - self._snapshot_at >= self.SNAPSHOT:
                    self.at_peak, self._snapshot_at = list(self.live.values()), self.peak
        elif label is not None and entry.label in (None, "kept"):
            entry.label = label
        return entry

    def ignore(self, tensor: torch.Tensor):
        """Never count `tensor`'s storage (memory the device does not hold), whatever operations return it later."""
        st = tensor.untyped_storage()
        key = st._cdata
        if key in self.live:
            self.now -= self.live[key].nbytes
        entry = self.live[key] = _Entry(0, "held elsewhere")
        entry.ref = weakref.ref(st, lambda _, key=key, e=entry: self._free(key, e))

    def _free(self, key, entry):
        if self.live.get(key) is entry:
            del self.live[key]
            self.now -= entry.nbytes

    def label_unlabelled(self, label):
        for entry in self.live.values():
            if entry.label is None:
                entry.label = label

    def breakdown(self) -> dict:
        """Bytes alive at the peak by category; what the snapshot missed counts as activations."""
        out = dict.fromkeys(CATEGORIES, 0)
        for entry in self.at_peak:
            if entry.nbytes:
                out[entry.label or "activations"] += entry.nbytes
        out["activations"] += self.peak - sum(out.values())
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SCALAR_READS:
            return _stand_in(args[0])
        out = func(*args, **(kwargs or {}))
        if self._memo:
            self._memo.clear()
        for t in [] if self.paused else tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.add(t)
        return out


_SCALAR_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                 torch.ops.aten.item.default}


def _stand_in(t):
    """The value a fake scalar reads as: True for a flag, 0 for an integer (a crop offset), 1.0 for a float
    (a finite loss; Adam's step count, which divides)."""
    if t.dtype == torch.bool:
        return True
    return 1.0 if t.dtype.is_floating_point else 0


def _storages_ok() -> bool:
    """Storage Python objects must outlive their wrappers (torch keeps them while a tensor uses them)."""
    t = torch.empty(1)
    ref = weakref.ref(t.untyped_storage())
    return ref() is not None


@contextmanager
def cuda_autocast_policy():
    """While CPU autocast is on, the functions CUDA autocast runs in fp32 but CPU autocast does not (group and
    layer norm, upsampling) get fp32 inputs when called on fake tensors, as on a GPU: their outputs, and
    what backward keeps of them, have CUDA's dtype and size. The functions are wrapped where modules look
    them up (torch.nn.functional), so checkpointing's recomputation inside backward follows the same rules."""
    from torch._subclasses.fake_tensor import FakeTensor

    def fp32(f):
        def wrapper(*args, **kwargs):
            tensors = [a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)]
            if not (_cpu_autocast_enabled() and any(isinstance(t, FakeTensor) for t in tensors)):
                return f(*args, **kwargs)

            def up(x):
                return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x
            with torch.autocast("cpu", enabled=False):
                return f(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        return wrapper
    saved = {name: getattr(F, name) for name in ("group_norm", "layer_norm", "interpolate")}
    try:
        for name, f in saved.items():
            setattr(F, name, fp32(f))
        yield
    finally:
        for name, f in saved.items():
            setattr(F, name, f)


class FakeDeepcopy(TorchFunctionMode):
    """copy.deepcopy of a fake tensor is a clone in the same fake mode (and counted); torch's default would
    deep-copy the mode too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__deepcopy__:
            return _fake_deepcopy(*args)
        return func(*args, **(kwargs or {}))


def _fake_deepcopy(tensor, memo):
    if id(tensor) not in memo:
        with torch.no_grad():
            out = tensor.clone()
        if getattr(tensor, "_is_param", False) or isinstance(tensor, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = out.requires_grad_(tensor.requires_grad)
    return memo[id(tensor)]


def _cpu_autocast_enabled():
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:                                    # torch < 2.4
        return torch.is_autocast_cpu_enabled()


@dataclass
class MemoryEstimate:
    peak: int                                 # bytes, as torch.cuda.max_memory_allocated would report
    breakdown: dict = field(default_factory=dict)   # category -> bytes alive at the peak (sums to peak)
    seconds: float = 0.0                      # wall time of the estimate on this CPU
    steps: int = 2

    def table(self) -> str:
        rows = [f"| {DESCRIPTIONS[k]} | {v / 2**30:.2f} GiB |" for k, v in self.breakdown.items()]
        return "\n".join(["| at the peak | |", "|---|---|", *rows, f"| **peak** | **{self.peak / 2**30:.2f} GiB** |"])


def fake_mode_of(module):
    """The FakeTensorMode a module's tensors belong to, or None for real tensors."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return getattr(t, "fake_mode", None)
    return None


def fake_copy(module, mode, dtype=None):
    """A structural copy of `module` whose parameters and buffers are fake CPU tensors (floating ones in
    `dtype` if given), inference tensors where the originals are; the module itself is not touched and
    no memory proportional to it is allocated. A module already fake in `mode` is returned as is."""
    if fake_mode_of(module) is mode:
        return module
    memo = {}
    with mode:
        for t in itertools.chain(module.parameters(), module.buffers()):
            dt = dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
            with torch.inference_mode(t.is_inference()):
                f = torch.empty_strided(t.shape, t.stride(), dtype=dt, device="cpu")
                memo[id(t)] = torch.nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else f
    out = copy.deepcopy(module, memo)
    if dtype is not None and isinstance(getattr(out, "dtype", None), torch.dtype):
        out.dtype = dtype                      # CompVis U-Nets cast their input to this
    return out


@contextmanager
def _paused(live: LiveBytes):
    """Operations inside are not counted (tensors that stay on the CPU)."""
    live.paused = True
    try:
        yield
    finally:
        live.paused = False


@contextmanager
def _held_on_cpu(live: LiveBytes):
    """What the tune holds in CPU memory on a GPU is not counted: Adam's moments with `offload_optimizer` (the pieces
    moved to the device for an update are counted), activations with `offload_activations` (the fake device is a
    CPU, so the tune is told it runs on a GPU; the copies made when backward needs them are counted)."""
    from . import optim, training
    saved = optim.state_zeros, training.offloads, training.hold_on_cpu, training.back_from_cpu

    def uncounted(make):
        def run(*args, **kwargs):
            with _paused(live):
                held = make(*args, **kwargs)
            live.ignore(held)
            return held
        return run
    def state_zeros(shape, dtype, device, held):
        return (saved[0] if held is None else uncounted(saved[0]))(shape, dtype, device, held)
    optim.state_zeros, training.offloads = state_zeros, (lambda device: True)
    training.hold_on_cpu = uncounted(lambda t: t.clone())
    training.back_from_cpu = lambda device, held: held.clone()
    try:
        yield
    finally:
        optim.state_zeros, training.offloads, training.hold_on_cpu, training.back_from_cpu = saved


@contextmanager
def _optimizer_labels(live: LiveBytes):
    """Labels trainable parameters, their gradients and optimizer state as each optimizer step begins and
    ends (torch's global optimizer hooks); everything else alive then is kept across steps."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    def label(opt, *_):
        for group in opt.param_groups:
            for p in group["params"]:
                live.add(p, "trainable")
                if p.grad is not None:
                    live.add(p.grad, "gradients")
        states = [t for state in opt.state.values() for t in tree_flatten(state)[0]]
        for t in states + getattr(opt, "state_tensors", list)():          # CompactAdamW keeps flat buckets
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                live.add(t, "optimizer")
        live.label_unlabelled("kept")
    handles = [register_optimizer_step_pre_hook(label), register_optimizer_step_post_hook(label)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def estimate_tune_peak(unet, cfg, *, text_model, encoder_config=None, weight_dtype=torch.float16,
                       autocast_dtype=torch.bfloat16, resident_bytes: int = 0, steps: int = 2,
                       clone_norm_inputs: bool | None = None) -> MemoryEstimate:
    """Peak device memory of `tune(unet, ..., cfg=cfg)` with the U-Net and text encoder held on the device in
    `weight_dtype`, the E4T weights on the CPU (heads and offsets are copied to the device by the tune),
    the concept image's features cached, and `autocast_dtype` autocast (None: fp32 training).

    unet / text_model: the host's modules, real or fake (nothing of theirs is touched or copied in memory).
    encoder_config: the E4T encoder's sizes (default: the published ViT-H/14 for this U-Net's features).
    resident_bytes: anything else the host keeps on the device meanwhile (counted in the peak).
    steps: tune steps to run (the second step has the optimizer state of the first: 2 reach the peak).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .encoder import Encoder, EncoderConfig, ImageFeatures, unet_feature_channels
    from .losses import sd1_alphas_cumprod
    from .offsets import Offsets, targets
    from .text import WordInjector
    from .precision import Precision
    from .tune import tune

    reason = supported() or (None if _storages_ok() else "this torch does not keep storage objects alive")
    if reason:
        raise RuntimeError(f"cannot estimate tune memory: {reason}")
    key = _cache_key(unet, text_model, cfg, encoder_config, weight_dtype, autocast_dtype, resident_bytes, steps,
                     clone_norm_inputs)
    if key in _CACHE:
        return replace(_CACHE[key], seconds=0.0)
    t0 = time.perf_counter()
    if clone_norm_inputs is None:
        from .training import residuals_in_place
        clone_norm_inputs = residuals_in_place(unet)
    mode = fake_mode_of(unet) or fake_mode_of(text_model) or FakeTensorMode(allow_non_fake_inputs=True)
    fake_unet = fake_copy(unet, mode, weight_dtype)
    fake_text = fake_copy(text_model, mode, weight_dtype)
    if encoder_config is None:
        encoder_config = EncoderConfig(unet_dim=sum(unet_feature_channels(fake_unet.model_channels,
                                                                          fake_unet.channel_mult, 2)),
                                       word_dim=fake_text.embeddings.token_embedding.weight.shape[1])
    res, batch = cfg.resolution, cfg.batch_size
    live = LiveBytes(mode)
    with mode, live, FakeDeepcopy(), cuda_autocast_policy(), _optimizer_labels(live), \
            _held_on_cpu(live):
        # What the host holds on the device when the tune starts: U-Net, text encoder (and the copies the
        # text callable runs on), cached image features, empty-prompt context.
        for t in itertools.chain(fake_unet.parameters(), fake_unet.buffers(), fake_text.parameters()):
            live.add(t)
        encode = WordInjector(fake_text).on_copies()
        ids = torch.zeros(batch, 77, dtype=torch.long)
        position = torch.zeros(batch, dtype=torch.long)
        with torch.no_grad():
            empty = encode(ids[:1], None, position[:1])
        tokens = torch.empty(1, encoder_config.n_tokens, encoder_config.vit_width)
        e_domain = torch.zeros(encoder_config.word_dim)
        image = torch.empty(3, res, res)
        live.label_unlabelled("resident")
        live.now += rounded(resident_bytes)
        live.peak = live.now
        # The E4T weights stay on the CPU: built uncounted.
        with _paused(live):
            encoder = Encoder(encoder_config).eval()
            offsets = Offsets(targets(fake_unet.state_dict()), identity=False)

        def text_encode(prompts, words):
            return encode(ids[: len(prompts)], words, position[: len(prompts)])

        def vae_encode(images):
            return torch.randn(images.shape[0], 4, res // 8, res // 8)

        tune(fake_unet, encoder, offsets, image, text_encode=text_encode, vae_encode=vae_encode, e_domain=e_domain,
             empty_context=empty, alphas_cumprod=sd1_alphas_cumprod(), cfg=replace(cfg, steps=steps),
             features=ImageFeatures(tokens=tokens), precision=Precision(autocast_dtype),
             clone_norm_inputs=clone_norm_inputs)
    breakdown = live.breakdown()
    breakdown["resident"] += rounded(resident_bytes)
    breakdown["activations"] -= rounded(resident_bytes)
    _CACHE[key] = MemoryEstimate(peak=live.peak, breakdown=breakdown, seconds=time.perf_counter() - t0, steps=steps)
    return _CACHE[key]


_CACHE = {}   # an estimate takes a minute at full size; the same architecture and settings give the same bytes


def _cache_key(unet, text_model, cfg, *settings):
    """Architecture (class, parameter names, shapes, dtypes) + every setting that can change the bytes."""
    def shapes(module):
        return (type(module).__qualname__,) + tuple((n, tuple(t.shape), t.dtype) for n, t in
                                                    itertools.chain(module.named_parameters(), module.named_buffers()))
    return hash((shapes(unet), shapes(text_model), replace(cfg, steps=0, seed=0, lr=0.0), settings, torch.__version__))


# --- choosing a memory mode -------------------------------------------------------------------------------------

# Peak GPU memory of a tune of full-size SD1.5 (fp16 weights, bf16 autocast, batch 16, 512 px) in GiB, estimated
# with `estimate_tune_peak` (benchmarks/memory.py, BENCHMARKS.md): what does not grow with the batch (the host's
# U-Net and text weights, trainable copies, optimizer state, per-step temporaries), what grows with batch x pixels
# (activations kept for backward), and what grows with the samples a layer runs at once x pixels (low_vram runs and
# recomputes layers 4 samples at a time), fitted to estimates at batch 16 / 512 px, 4 / 512 px and 4 / 256 px.
TUNE_PEAK_GIB = {
    ("fast", "all"): (16.0, 28.5, 0.0),
    ("fast", "attention"): (8.9, 25.1, 0.0),
    ("low_vram", "all"): (6.33, 0.23, 0.34),      # 6.90 GiB at batch 16, 6.73 at batch 4, 6.43 at batch 4 / 256 px
    ("low_vram", "attention"): (4.93, 0.02, 0.0),  # 4.95 GiB at batch 16, 4.94 at batch 4
}
HEADROOM = 1.1                         # the allocator's rounding and fragmentation, the host's own buffers


def tune_peak(mode: str, trains: str = "all", batch_size: int = 16, resolution: int = 512) -> float:
    """Estimated peak GPU memory (bytes) of an SD1.5 tune in `mode`, from the table above."""
    from .tune import memory_settings
    fixed, activations, layer = TUNE_PEAK_GIB[(mode, trains)]
    pixels = resolution ** 2 / 512 ** 2
    at_once = min(batch_size, memory_settings(mode).get("layer_chunk") or batch_size)
    return (fixed + activations * batch_size / 16 * pixels + layer * at_once / 4 * pixels) * 2**30


def available_memory(device) -> int:
    """Bytes a tune may use on `device`: a GPU's memory less what other processes hold (this process's models can
    be moved off by the host); the CPU's RAM (also Apple's unified memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - max(0, (total - free) - torch.cuda.memory_reserved(device))
    if hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 0


def memory_mode(mode: str, device, available: int | None = None, trains: str = "all", batch_size: int = 16,
                resolution: int = 512) -> str:
    """'auto' -> the fastest mode whose estimated peak, with headroom, fits in `available` bytes (default:
    `available_memory(device)`); other modes as given. When none fits, an InputError (a ValueError) says what
    would, before anything is loaded."""
    if mode != "auto":
        return mode
    available = available_memory(device) if available is None else available
    for candidate in ("fast", "low_vram"):
        if tune_peak(candidate, trains, batch_size, resolution) * HEADROOM <= available:
            return candidate
    need = tune_peak("low_vram", trains, batch_size, resolution) * HEADROOM / 2**30
    smaller = [f"batch_size {b}" for b in (8, 4, 2, 1) if b < batch_size
               and tune_peak("low_vram", trains, b, resolution) * HEADROOM <= available][:1]
    if trains == "all" and tune_peak("low_vram", "attention", batch_size, resolution) * HEADROOM <= available:
        smaller.append("trains: attention")
    from .validate import InputError
    raise InputError(f"this tune needs about {need:.1f} GiB in low_vram mode (batch {batch_size}, {resolution} px, "
                     f"trains {trains}), and {torch.device(device)} has {available / 2**30:.1f} GiB for it. "
                     + (f"Try {' or '.join(smaller)}." if smaller else "Lower batch_size or resolution."))
