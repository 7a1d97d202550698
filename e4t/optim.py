"""AdamW with compact moments, optionally stepped inside backward: the memory-lean tune's optimizer (and `adamw`:
torch's own, fused wherever torch has it, for the fp32 paths).

Moments are stored in bf16 (4 bytes per trained parameter instead of fp32 AdamW's 8) or in 8 bits per value
with one fp32 scale per block of 256 (2 bytes), always rounded stochastically, so the second moment's 0.1 %
steps, finer than the stored resolution, are kept on average over long runs. The update itself is computed in
fp32. A parameter is either a plain tensor or a *delta* over a frozen base weight (`bases`): the trained weight
is base + delta, so decoupled weight decay shrinks base + delta, and the delta may be bf16 because it starts at 0
and stays small (an fp16/bf16 master weight would lose updates of 1e-4 relative; a delta does not).

Parameters are processed in buckets of at most `chunk` elements whose state lives in flat buffers: a step costs a
few dozen kernels per bucket, not per tensor. `step_in_backward()` runs each bucket's update as soon as autograd
has finished its gradients (`register_post_accumulate_grad_hook`) and frees them, so no full set of gradients is
ever held; global gradient clipping cannot be applied then (it needs every gradient first).
"""
import torch

BLOCK = 256
PIECE = 1 << 22           # elements updated at once (a multiple of BLOCK): bounds the step's fp32 temporaries


def stochastic_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounded up or down with probabilities that make the result unbiased.

    Adds uniform noise in [0, 2^16) to the low 16 bits of the fp32 pattern and truncates them: the magnitude rounds
    away from zero with probability equal to the dropped fraction, for either sign. Zero (of either sign) and
    denormals stay finite and keep their sign; infinities and NaN are converted as they are. (Signed noise, as
    before, turned +0.0 minus one step into the pattern 0xFFFFFFFF: a NaN.)"""
    x = x.float().contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((x.view(torch.int32) + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)     # exact: the low 16 bits are zero


def _levels(kind: str) -> torch.Tensor:
    """The 8-bit code's values, ascending. "linear": 255 evenly spaced values in [-1, 1]. "log": 256 values in
    [0, 1] with 3 mantissa bits and a 5-bit exponent (holds a block's range of v over 2^31), 0 included."""
    if kind == "linear":
        return torch.linspace(-1, 1, 255)
    mags = [m / 8 * 2.0 ** -30 for m in range(8)]                                     # subnormals, 0 included
    mags += [(1 + m / 8) * 2.0 ** (e - 31) for e in range(1, 32) for m in range(8)]
    mags = torch.tensor(mags, dtype=torch.float64)
    return (mags / mags.max()).float()


def state_zeros(shape, dtype, device, held) -> torch.Tensor:
    """Optimizer state for tensors on `device`, held on `held` (None: `device`); CPU memory that serves a GPU is
    pinned, so pieces move without a staging copy."""
    held = torch.device(device if held is None else held)
    pin = held.type == "cpu" and torch.device(device).type == "cuda"
    return torch.zeros(shape, dtype=dtype, device=held, pin_memory=pin)


class Quantized8:
    """A flat fp32 vector stored as 8-bit codes with one fp32 scale (absolute maximum) per block of 256, rounded
    stochastically (unbiased) between the two nearest code values. Codes and scales may be held on another
    device than the one computing (`held`); pieces move when read or written."""

    def __init__(self, n: int, device, kind: str, held=None):
        self.n, self.device = n, torch.device(device)
        blocks = (n + BLOCK - 1) // BLOCK
        self.levels = _levels(kind).to(device)
        zero = int(self.levels.abs().argmin())
        self.codes = state_zeros(blocks * BLOCK, torch.uint8, device, held).fill_(zero)
        self.scale = state_zeros(blocks, torch.float32, device, held)

    def get(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Values [start, end)."""
        end = self.n if end is None else end
        b0, b1 = start // BLOCK, -(-end // BLOCK)
        codes, scale = (t.to(self.device, non_blocking=True) for t in (self.codes[b0 * BLOCK:b1 * BLOCK], self.scale[b0:b1]))
        x = self.levels[codes.int()].view(-1, BLOCK) * scale[:, None]
        return x.flatten()[start - b0 * BLOCK:end - b0 * BLOCK]

    def set(self, x: torch.Tensor, generator: torch.Generator, start: int = 0):
        """Store x as values [start, start + len(x)) (start a multiple of the block; x ends at a block's end or at n)."""
        b0, b1 = start // BLOCK, -(-(start + x.numel()) // BLOCK)
        blocks = torch.nn.functional.pad(x.float(), (0, (b1 - b0) * BLOCK - x.numel())).view(-1, BLOCK)
        scale = blocks.abs().amax(1)
        y = (blocks / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).flatten()
        hi = torch.searchsorted(self.levels, y.clamp(self.levels[0], 1.0), out_int32=True)
        hi = hi.clamp_(1, len(self.levels) - 1)
        lo_v, hi_v = self.levels[hi - 1], self.levels[hi]
        up = torch.rand(y.shape, device=y.device, generator=generator) * (hi_v - lo_v) < (y - lo_v)
        self.codes[b0 * BLOCK:b1 * BLOCK].copy_((hi - (~up).int()).to(torch.uint8))
        self.scale[b0:b1].copy_(scale)


class _Bucket:
    """Consecutive parameters (one device) and their moments in flat buffers."""

    def __init__(self, params, states: str, generator, held=None):
        self.params = params
        self.sizes = [p.numel() for p in params]
        n, self.device = sum(self.sizes), params[0].device
        self.step = 0
        if states == "8bit":   # v on a log scale, and m / sqrt(v) (bounded for Adam) on a linear one
            self.v, self.r = Quantized8(n, self.device, "log", held), Quantized8(n, self.device, "linear", held)
        else:
            self.flat = state_zeros((2, n), torch.bfloat16 if states == "bf16" else torch.float32, self.device, held)
        self.states, self.generator = states, generator

    def moments(self, start: int = 0, end: int | None = None):
        """(m, v) of elements [start, end) in fp32."""
        if self.states == "8bit":
            v = self.v.get(start, end)
            return self.r.get(start, end) * v.sqrt(), v
        return tuple(self.flat[i, start:end].to(self.device).float() for i in (0, 1))

    def store(self, m, v, start: int = 0):
        """Store the moments of elements [start, start + len(m)).

        8 bits: a step uses m / sqrt(v), so that ratio is what is stored on a linear scale, with an error that is
        small next to the update itself: v is stored first (unbiased), then m / sqrt(stored v) (0 where that is 0,
        which only denormal gradients give)."""
        end = start + m.numel()
        if self.states == "8bit":
            self.v.set(v, self.generator, start)
            s = self.v.get(start, end).sqrt()
            self.r.set(torch.where(s > 0, m / s.clamp_min(torch.finfo(torch.float32).tiny), 0.0), self.generator, start)
        elif self.states == "bf16":
            self.flat[0, start:end].copy_(stochastic_bf16(m, self.generator))
            self.flat[1, start:end].copy_(stochastic_bf16(v, self.generator))
        else:
            self.flat[0, start:end].copy_(m)
            self.flat[1, start:end].copy_(v)


def _copy_back(params, flat):
    """Write a flat fp32 vector into the parameters it was gathered from (bf16 ones rounded by the caller)."""
    views = [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params)]
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(params, views)
    else:                                                                      # torch < 2.2
        for p, v in zip(params, views):
            p.copy_(v)


class CompactAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) with bf16, 8-bit or fp32 stored moments.

    bases: {parameter: frozen tensor}; such a parameter is a delta and the weight is base + delta.
    loss_scale: gradients are divided by it (fp16 dynamic loss scaling); a bucket whose gradients are not finite
    is then left as it was and `finished()` says so (the caller retries those buckets with a smaller scale).
    Otherwise a non-finite gradient clears the device flag `finite` (read once per step by the caller).
    held: where the moments are held (None: with their parameters; "cpu": in CPU memory, moved to the GPU a piece at
    a time for the update, which costs two transfers of the state per step and frees it from the GPU)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, states="bf16",
                 chunk=1 << 23, bases=None, held=None):
        if states not in ("fp32", "bf16", "8bit"):
            raise ValueError(f"unknown optimizer_states {states!r}: use 'fp32', 'bf16' or '8bit'")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.states, self.chunk, self.bases, self.held = states, chunk, bases or {}, held
        self.loss_scale = 1.0
        self.finite = None                       # device flag: every gradient of this step was finite
        self._generators = {}                    # per device, fixed seed: a tune stays reproducible
        self._buckets, self._of = [], {}
        self._forming, self._laid_out = [], False
        self._pending, self._done, self._hooks = {}, set(), []

    @property
    def _group(self):
        return self.param_groups[0]

    def _generator(self, device):
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(0)
        return self._generators[device]

    def _form(self, p=None):
        """Lay out buckets in the order gradients arrive (first step): consecutive parameters of one device up to
        `chunk` elements. Returns the bucket closed by adding `p` (None: close what is open)."""
        if p is not None and self._forming and (p.device != self._forming[0].device
                                                or sum(q.numel() for q in self._forming) + p.numel() > self.chunk):
            closed = self._form()
            self._forming = [p]
            return closed
        if p is not None:
            self._forming.append(p)
            return None
        if not self._forming:
            return None
        bucket = _Bucket(self._forming, self.states, self._generator(self._forming[0].device), self.held)
        self._buckets.append(bucket)
        self._of.update({q: bucket for q in self._forming})
        self._forming = []
        return bucket

    @torch.no_grad()
    def _update(self, bucket: _Bucket) -> bool:
        ps = bucket.params
        g = torch.cat([p.grad.flatten() for p in ps]).float()
        if self.loss_scale != 1.0:
            g.div_(self.loss_scale)
        for p in ps:
            p.grad = None                                                      # freed as soon as it is read
        finite = torch.isfinite(g).all()
        if self.loss_scale != 1.0 and not bool(finite):                        # fp16: skip, the caller retries
            return False
        self.finite = finite if self.finite is None else self.finite & finite
        lr, (b1, b2), eps, wd = (self._group[k] for k in ("lr", "betas", "eps", "weight_decay"))
        bucket.step += 1
        new = torch.cat([p.flatten() for p in ps]).float()
        if wd:                                                                 # decoupled decay of the weight
            weight = new
            if any(p in self.bases for p in ps):
                weight = new + torch.cat([self.bases.get(p, torch.zeros_like(p)).flatten().float() for p in ps])
            new.sub_(weight, alpha=lr * wd)
            del weight
        for start in range(0, len(g), PIECE):                                 # the update's temporaries: a piece's
            gp = g[start:start + PIECE]
            m, v = bucket.moments(start, start + len(gp))
            m.lerp_(gp, 1 - b1)                                                # m = b1 m + (1 - b1) g
            v.mul_(b2).addcmul_(gp, gp, value=1 - b2)                          # v = b2 v + (1 - b2) g²
            bucket.store(m, v, start)                                          # (fp32: m, v are the state)
            update = (m / (1 - b1 ** bucket.step)).div_((v / (1 - b2 ** bucket.step)).sqrt_().add_(eps))
            new[start:start + len(gp)].sub_(update, alpha=lr)
        del g
        for dtype in {p.dtype for p in ps}:
            idx = [i for i, p in enumerate(ps) if p.dtype == dtype]
            part = torch.cat([new.split(bucket.sizes)[i] for i in idx]) if len(idx) < len(ps) else new
            if dtype == torch.bfloat16:
                part = torch.cat([stochastic_bf16(x, bucket.generator) for x in part.split(PIECE)])
            _copy_back([ps[i] for i in idx], part)
        return True

    def step(self):
        """The usual optimizer step: every parameter updated from its .grad."""
        if not self._laid_out:
            for p in self._group["params"]:
                if p.grad is not None:
                    self._form(p)
            self._form()
            self._laid_out = True
        for bucket in self._buckets:
            if any(p.grad is None for p in bucket.params):
                raise RuntimeError("CompactAdamW: a parameter trained in the first step has no gradient now")
            self._update(bucket)

    # --- inside backward ----------------------------------------------------------------------------------------
    def step_in_backward(self):
        """From now on each bucket is updated as soon as autograd has completed its gradients; call `begin()` before
        and `finished()` after each step's backward passes. `remove()` detaches the hooks."""
        for p in self._group["params"]:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._ready))
        return self

    def _ready(self, p):
        if not self._laid_out:
            bucket = self._form(p)
            if bucket is not None and self._update(bucket):
                self._done.add(bucket)
            return
        bucket = self._of.get(p)
        if bucket is None:
            raise RuntimeError("CompactAdamW: a parameter without a gradient in the first step has one now")
        if bucket in self._done:                       # updated already in this step (a retry of other buckets)
            p.grad = None
            return
        self._pending.setdefault(bucket, set()).add(p)
        if len(self._pending[bucket]) == len(bucket.params):
            del self._pending[bucket]
            if self._update(bucket):
                self._done.add(bucket)

    def begin(self):
        """Start a step's backward passes (or a retry of the buckets left out by an overflow)."""
        self._pending = {}

    def finished(self) -> bool:
        """After a step's backward passes: True when every bucket was updated; False asks for a retry (fp16 overflow:
        lower `loss_scale`, run the same batch again; buckets already updated are skipped)."""
        if not self._laid_out:
            bucket = self._form()
            if bucket is not None and self._update(bucket):
                self._done.add(bucket)
            self._laid_out = True
        if self._pending:
            raise RuntimeError("CompactAdamW: a parameter trained in the first step has no gradient now")
        complete = len(self._done) == len(self._buckets)
        if complete:
            self._done = set()
        return complete

    def moments(self, p) -> tuple:
        """(m, v) of parameter `p` as stored, in fp32 (for inspection)."""
        bucket = self._of[p]
        start = sum(bucket.sizes[:next(i for i, q in enumerate(bucket.params) if q is p)])
        return tuple(x.view_as(p) for x in bucket.moments(start, start + p.numel()))

    def state_tensors(self) -> list:
        """The tensors of optimizer state held (moments and their scales)."""
        return [t for b in self._buckets
                for t in ([b.v.codes, b.v.scale, b.r.codes, b.r.scale] if b.states == "8bit" else [b.flat])]

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []


def adamw(params, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over all parameters) on CUDA and, where this torch has it (2.4 and newer), on
    the CPU, where torch's default steps one parameter at a time: ~10 operations each, a host sync per parameter and
    a pass over memory per operation (5.5x the time of the fused step on 148 M U-Net parameters, BENCHMARKS.md).
    Elsewhere (MPS, older torch such as the webui's 2.1) torch's default."""
    if torch.device(device).type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except RuntimeError:                     # no fused kernel for this device in this torch
            pass
    return torch.optim.AdamW(params, **kwargs)
