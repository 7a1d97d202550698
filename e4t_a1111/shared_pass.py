"""The negative prompt's U-Net pass shared with the refinement's feature pass.

With CFG and an empty negative prompt, the webui's unconditional rows run the U-Net on the latent, at the
timestep and with the empty context that the feature pass uses to predict w: their down/mid block outputs are
the maps the feature pass has just computed. So, from the denoiser callback (before the webui's U-Net call),
`SharedRows` hands those maps to the webui's batched call that follows: a one-shot pre-hook on the model wrapper
(`denoiser.inner_model`) checks that the call is the one expected (the same unconditional latent, sigma, context
and image conditioning after the prompt rows), and only then every input block and the middle block compute the
prompt rows and splices the kept maps in (`e4t.KnownRows`); the output blocks run on the whole batch. The same
operations as the separate feature pass, the FLOPs of plain sampling.

Where `unsupported` names a reason the negative's pass runs whole, as before: a negative prompt (or anything
making its encoding differ from the empty context), a prompt longer than the negative prompt (the webui then
calls the U-Net per part), "batch cond/uncond" off, NGMS or skip-early-CFG (the webui may drop the
unconditional rows), a model that is not text-conditioned only, hooks or forwards of other extensions on the
U-Net or its wrappers (ControlNet and the like see the batch they expect).
"""
import torch

import e4t

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


class SharedRows:
    """One denoiser call's unconditional rows, whose down/mid block outputs the feature pass has just computed
    (`maps`), handed to the webui's next U-Net call (`hand_over`): there every down/mid block computes the prompt
    rows only (`e4t.KnownRows`)."""

    def __init__(self, params, unet, rows: int, maps: list):
        n = params.text_uncond.shape[0]
        self.inner, self.rows, self.handles, self.known = params.denoiser.inner_model, rows, [], None
        self.x, self.sigma = params.x[-n:], params.sigma[-n:]
        self.uncond, self.image_cond = params.text_uncond, params.image_cond[-n:]
        self.unet, self.maps = unet, maps

    def hand_over(self):
        """From now until the model wrapper's next call returns."""
        self.handles = [self.inner.register_forward_pre_hook(self._arm, with_kwargs=True),
                        self.inner.register_forward_hook(self._disarm)]

    def _arm(self, module, args, kwargs):
        n, cond = self.x.shape[0], kwargs.get("cond")
        expected = (len(args) == 2 and isinstance(cond, dict) and set(cond) == {"c_crossattn", "c_concat"}
                    and args[0].shape[0] == self.rows + n and torch.equal(args[0][-n:], self.x)
                    and torch.equal(args[1][-n:], self.sigma)
                    and torch.equal(cond["c_crossattn"][0][-n:], self.uncond)
                    and torch.equal(cond["c_concat"][0][-n:], self.image_cond))
        if expected:                               # otherwise not the call this was made for: the webui computes all
            self.known = e4t.KnownRows.down_path(self.unet, self.maps, self.rows + n, slice(self.rows, self.rows + n))
            self.known.install()

    def _disarm(self, module, args, out):
        self.remove()

    @property
    def spliced(self) -> int:
        return 0 if self.known is None else self.known.spliced

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.known is not None:
            self.known.remove()
