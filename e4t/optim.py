"""AdamW with its two moments stored in bf16: half of Adam's memory (4 instead of 8 bytes per trained
parameter), which at E4T's 1.2 B trained parameters is 4.9 GB. Used by the low-VRAM tune.

The update itself is computed in fp32 on fp32 parameters; only the stored moments are rounded (bf16
keeps fp32's exponent range: nothing under- or overflows), and stochastically, so that the second
moment's 0.1 % steps, smaller than bf16's resolution, are not lost over long tunes. Parameters are
processed in chunks of at most `chunk` elements whose moments live in one flat buffer each: a step
costs a few kernels per chunk, not per tensor, and its fp32 temporaries stay small.
"""
import torch


class CompactAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 state_dtype=torch.bfloat16, chunk=1 << 24):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype, self.chunk = state_dtype, chunk
        self._generators = {}                    # per device, fixed seed: a tune stays reproducible
        self._chunks = None                      # per param group: [(params, moments (2, n) flat buffer)]

    def _layout(self, params):
        """Consecutive parameters with gradients (same device) grouped up to `chunk` elements; each
        parameter's state["m"] / state["v"] is a view into its chunk's buffer."""
        groups, batch = [], []
        for p in [p for p in params if p.grad is not None] + [None]:
            if batch and (p is None or p.device != batch[0].device
                          or sum(q.numel() for q in batch) + p.numel() > self.chunk):
                flat = torch.zeros(2, sum(q.numel() for q in batch), dtype=self.state_dtype, device=batch[0].device)
                for q, m, v in zip(batch, *(row.split([q.numel() for q in batch]) for row in flat)):
                    self.state[q].update(step=0, m=m.view_as(q), v=v.view_as(q))
                groups.append((batch, flat))
                batch = []
            if p is not None:
                batch.append(p)
        return groups

    @torch.no_grad()
    def step(self):
        if self._chunks is None:
            self._chunks = [self._layout(group["params"]) for group in self.param_groups]
        for group, chunks in zip(self.param_groups, self._chunks):
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for ps, flat in chunks:
                if any(p.grad is None for p in ps):
                    raise RuntimeError("CompactAdamW: a parameter trained in the first step has no gradient now")
                moments = flat.float()                                              # (2, n) fp32
                m, v = ([t.view_as(p) for t, p in zip(row.split([p.numel() for p in ps]), ps)] for row in moments)
                grads = [p.grad.float() for p in ps]
                steps = []
                for p in ps:
                    self.state[p]["step"] += 1
                    steps.append(self.state[p]["step"])
                torch._foreach_lerp_(m, grads, 1 - b1)                              # m = b1 m + (1 - b1) g
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, grads, grads, 1 - b2)                     # v = b2 v + (1 - b2) g²
                torch._foreach_mul_(ps, 1 - lr * wd)                                 # decoupled weight decay
                denom = torch._foreach_sqrt(torch._foreach_div(v, [1 - b2 ** s for s in steps]))
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, m, denom, [-lr / (1 - b1 ** s) for s in steps])
                flat.copy_(self._stochastic(moments))

    def _stochastic(self, x):
        """fp32 prepared for bf16 stochastic rounding: noise of ± half a bf16 step added to the low 16 bits,
        so that the round-to-nearest copy that follows is unbiased for either sign. Overwrites x."""
        if x.device not in self._generators:
            self._generators[x.device] = torch.Generator(device=x.device).manual_seed(0)
        noise = torch.randint(-(1 << 15), 1 << 15, x.shape, dtype=torch.int32, device=x.device,
                              generator=self._generators[x.device])
        x.view(torch.int32).add_(noise)
        return x
