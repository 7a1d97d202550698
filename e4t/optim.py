"""AdamW with its two moments stored in bf16: half of Adam's memory (4 instead of 8 bytes per trained
parameter), which at E4T's 1.2 B trained parameters is 4.9 GB. Used by the low-VRAM tune.

The update itself is computed in fp32 on fp32 parameters; only the stored moments are rounded (bf16
keeps fp32's exponent range: nothing under- or overflows), and stochastically, so that the second
moment's 0.1 % steps, smaller than bf16's resolution, are not lost over long tunes. Parameters are
processed in chunks of at most `chunk` elements with foreach kernels: the fp32 temporaries stay small.
"""
import torch


class CompactAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 state_dtype=torch.bfloat16, chunk=1 << 24):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype, self.chunk = state_dtype, chunk
        self._generators = {}                    # per device, fixed seed: a tune stays reproducible

    def _chunks(self, params):
        batch, size = [], 0
        for p in params:
            if batch and size + p.numel() > self.chunk:
                yield batch
                batch, size = [], 0
            batch.append(p)
            size += p.numel()
        if batch:
            yield batch

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for ps in self._chunks([p for p in group["params"] if p.grad is not None]):
                states = [self.state[p] for p in ps]
                for p, st in zip(ps, states):
                    if not st:
                        st["step"] = 0
                        st["m"] = torch.zeros_like(p, dtype=self.state_dtype)
                        st["v"] = torch.zeros_like(p, dtype=self.state_dtype)
                    st["step"] += 1
                grads = [p.grad.float() for p in ps]
                m = [st["m"].float() for st in states]
                v = [st["v"].float() for st in states]
                torch._foreach_lerp_(m, grads, 1 - b1)                       # m = b1 m + (1 - b1) g
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, grads, grads, 1 - b2)              # v = b2 v + (1 - b2) g²
                torch._foreach_mul_(ps, 1 - lr * wd)                          # decoupled weight decay
                denom = torch._foreach_sqrt(torch._foreach_div(v, [1 - b2 ** st["step"] for st in states]))
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, m, denom, [-lr / (1 - b1 ** st["step"]) for st in states])
                self._store([st["m"] for st in states] + [st["v"] for st in states], m + v)

    def _store(self, dst, src):
        """fp32 -> bf16 by stochastic rounding: noise of ± half a bf16 step added to the low 16 bits, then
        round-to-nearest; unbiased for either sign. `src` (fp32 temporaries) is overwritten."""
        device = src[0].device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(0)
        noise = torch.randint(-(1 << 15), 1 << 15, (sum(t.numel() for t in src),), dtype=torch.int32,
                              device=device, generator=self._generators[device])
        bits = [t.view(torch.int32) for t in src]
        torch._foreach_add_(bits, [n.view_as(b) for n, b in zip(noise.split([t.numel() for t in src]), bits)])
        for d, s in zip(dst, src):
            d.copy_(s)
