"""The negative prompt's U-Net pass shared with the refinement's feature pass.

With CFG and an empty negative prompt, the webui's unconditional rows run the U-Net on the latent, at the
timestep and with the empty context that the feature pass uses to predict w: their down/mid block outputs
are the encoder's input. So, from the denoiser callback (before the webui's U-Net call), `UncondPass` runs
the unconditional rows first, alone, through the webui's own model wrapper (`denoiser.inner_model`), keeping
those block outputs; w comes from them; and the webui's batched call that follows computes the prompt rows
only: a one-shot pre-hook on the model wrapper takes the unconditional rows out of its batch, a forward hook
appends the kept output. The pre-hook checks that the call is the one expected (the same unconditional
latent, sigma, context and image conditioning after the prompt rows) and otherwise leaves it whole.

Off by default (Settings > E4T): in the webui on a 2-core CPU at 256 px, two U-Net passes of one image each
cost more than one pass of two plus the separate half pass (BENCHMARKS.md), while at 512 px (ComfyUI) sharing
was the faster; on GPUs it is not yet measured.

Where `unsupported` names a reason the feature pass runs separately, as before: a negative prompt (or
anything making its encoding differ from the empty context), a prompt longer than the negative prompt (the
webui then calls the U-Net per part), "batch cond/uncond" off, NGMS or skip-early-CFG (the webui may drop
the unconditional rows), a model that is not text-conditioned only, hooks or forwards of other extensions
on the U-Net or its wrappers (ControlNet and the like see the batch they expect).
"""
import torch

from . import host


def enabled() -> bool:
    """The user's choice (Settings > E4T)."""
    return bool(host.opt("e4t_share_negative_pass", False))


def unsupported(params, rows: int, empty_context: torch.Tensor) -> str | None:
    """Why this denoiser call's unconditional pass cannot give the feature pass's maps (None: it can)."""
    from modules import shared
    opts, den, sd_model = shared.opts, params.denoiser, shared.sd_model
    if not opts.batch_cond_uncond:
        return "'Batch cond/uncond' is off"
    if opts.skip_early_cond:
        return "skip early CFG is on"
    if (getattr(getattr(den, "sampler", None), "s_min_uncond", 0) or 0) > 0:
        return "negative guidance minimum sigma (NGMS) is on"
    if getattr(sd_model.model, "conditioning_key", None) != "crossattn":
        return f"conditioning {getattr(sd_model.model, 'conditioning_key', None)!r}"
    cond, uncond = params.text_cond, params.text_uncond
    if not isinstance(uncond, torch.Tensor) or cond.shape[1] != uncond.shape[1]:
        return "the prompt is longer than the negative prompt"
    if params.x.shape[0] != rows + uncond.shape[0] or params.image_cond is None:
        return "an unexpected batch layout"
    empty = empty_context.to(uncond)
    if empty.shape[-2:] != uncond.shape[-2:] or not torch.equal(uncond, empty.expand_as(uncond)):
        return "the negative prompt is not empty"
    unet = host.unet(sd_model)
    for module in (den.inner_model, sd_model, sd_model.model, unet):
        if "forward" in vars(module):
            return f"another extension replaced the forward of the {type(module).__name__}"
        hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
        if not all(_ours(hook) for hook in hooks):
            return f"another extension hooks the {type(module).__name__}"
    return None


def _ours(hook) -> bool:
    """The webui's --medvram hook, or E4T's guard."""
    return getattr(hook, "__name__", "") == "send_me_to_gpu" or \
        type(getattr(hook, "__self__", None)).__name__ == "_Guard"


class UncondPass:
    """One denoiser call's unconditional rows, run when made (ahead of the webui's U-Net call), then taken out
    of that call (`hand_over`)."""

    def __init__(self, params, unet, rows: int):
        n = params.text_uncond.shape[0]
        self.inner, self.rows, self.handles, self.narrowed = params.denoiser.inner_model, rows, [], False
        self.x, self.sigma = params.x[-n:], params.sigma[-n:]
        self.uncond, self.image_cond = params.text_uncond, params.image_cond[-n:]
        maps, blocks = [], list(unet.input_blocks) + [unet.middle_block]
        kept = [block.register_forward_hook(lambda module, args, out: maps.append(out)) for block in blocks]
        try:
            self.out = self.inner(self.x, self.sigma, cond=self._cond(self.uncond, self.image_cond))
        finally:
            for handle in kept:
                handle.remove()
        self.maps = maps if len(maps) == len(blocks) else None      # None: run the feature pass

    @staticmethod
    def _cond(crossattn, concat):
        return {"c_crossattn": [crossattn], "c_concat": [concat]}      # the webui's make_condition_dict

    def hand_over(self):
        """From now until the model wrapper's next call: that call computes the prompt rows only."""
        self.handles = [self.inner.register_forward_pre_hook(self._narrow, with_kwargs=True),
                        self.inner.register_forward_hook(self._append)]

    def _narrow(self, module, args, kwargs):
        n, cond = self.x.shape[0], kwargs.get("cond")
        expected = (len(args) == 2 and isinstance(cond, dict) and set(cond) == {"c_crossattn", "c_concat"}
                    and args[0].shape[0] == self.rows + n and torch.equal(args[0][-n:], self.x)
                    and torch.equal(args[1][-n:], self.sigma)
                    and torch.equal(cond["c_crossattn"][0][-n:], self.uncond)
                    and torch.equal(cond["c_concat"][0][-n:], self.image_cond))
        if not expected:                           # not the call this pass was made for: the webui computes all
            return None
        self.narrowed = True
        rows = self._cond(cond["c_crossattn"][0][:-n], cond["c_concat"][0][:-n])
        return (args[0][:-n], args[1][:-n]), {**kwargs, "cond": rows}

    def _append(self, module, args, out):
        self.remove()
        if self.narrowed:
            return torch.cat([out, self.out.to(out)])
        return None

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []
