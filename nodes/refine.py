"""Applying E4T to a MODEL: offset patches plus the per-step refinement of placeholder prompts.

At every model evaluation the wrapper predicts w from the current noisy latent (the U-Net's own down
path with the empty prompt) and the cached concept-image features, re-encodes only the conditioning
made by "E4T Text Encode" with the CLIP wired into that node (its CLIP skip and LoRAs), and leaves every
other conditioning (negative prompt included) untouched.
"""
import logging

import torch

import comfy.conds
import comfy.model_management
import comfy.model_patcher

from ..e4t import Refinement, base_fingerprint as fingerprint, check_base
from .inputs import check_model
from .model import E4T
from .patches import PREFIX, add_e4t_patches, unpatched
from .prompt import LEGACY

try:
    from comfy.patcher_extension import WrappersMP
except ImportError:  # ComfyUI before keyed wrappers (e.g. the March 2024 copy)
    WrappersMP = None

KEY = "e4t"


def base_fingerprint(model) -> str:
    """The engine's fingerprint of the base U-Net (first and last convolution, without any patch)."""
    sd = model.model_state_dict()
    return fingerprint(*(unpatched(model, PREFIX + k, sd) for k in ("input_blocks.0.0.weight", "out.2.weight")))


def domain_token(clip, word: str) -> int:
    special = {t[0] for t in clip.tokenize("")["l"][0]}
    ids = [t[0] for t in clip.tokenize(word)["l"][0] if t[0] not in special]
    if len(ids) != 1:
        raise ValueError(f"E4T: the domain word {word!r} is {len(ids)} CLIP tokens; it must be exactly one")
    return ids[0]


def text_model(cond_stage_model):
    return cond_stage_model.clip_l.transformer.text_model


class RefineState:
    """What the per-step wrapper needs, kept out of model_options (which clones copy)."""

    def __init__(self, folded, empty_context, e_domain, scale: float, t_stop: float):
        self.folded, self.empty_context, self.e_domain = folded, empty_context, e_domain
        self.scale, self.t_stop = scale, t_stop
        self.refinement, self.evaluations = None, 0

    def words(self, base_model, x, sigma, folded=None) -> torch.Tensor:
        """w (b, d) for the latents x at noise level sigma."""
        if self.refinement is None or self.refinement.empty_context.device != x.device:
            self.refinement = Refinement(folded or self.folded.to(x.device), self.e_domain.to(x.device),
                                         self.empty_context.to(x.device), self.scale, self.t_stop)
        if folded is not None:
            self.refinement.encoder = folded
        sampling = base_model.model_sampling
        xs = sampling.calculate_input(sigma, x)
        t = sampling.timestep(sigma).float()
        dtype = getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()
        self.evaluations += 1
        return self.refinement(base_model.diffusion_model, xs, t, dtype)


def refine_state(model):
    """The RefineState of a MODEL made by Apply E4T / E4T Personalize, or None."""
    if hasattr(model, "get_attachment") and model.get_attachment(KEY) is not None:
        return model.get_attachment(KEY)
    return getattr(model, "e4t_state", None)


def _calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    """Keyed CALC_COND_BATCH wrapper: new contexts for conditionings that carry an E4T prompt."""
    patcher = model.current_patcher
    state = patcher.get_attachment(KEY) if patcher is not None else None
    if state is None or not any(c is not None and any(KEY in d for d in c) for c in conds):
        return executor(model, conds, x_in, timestep, model_options)
    (head_patcher,) = patcher.get_additional_models_with_key(KEY)
    words = state.words(model, x_in, timestep, head_patcher.model)
    cache, new_conds = {}, []
    for group in conds:
        if group is None:
            new_conds.append(None)
            continue
        out = []
        for d in group:
            if KEY in d:
                prompt, old = d[KEY], d["model_conds"]["c_crossattn"].cond
                if id(prompt) not in cache:     # where the host keeps conds, so it still batches cond and uncond
                    cache[id(prompt)] = prompt.context(words, old.device).to(old.dtype)
                d = dict(d)
                d["model_conds"] = dict(d["model_conds"])
                d["model_conds"]["c_crossattn"] = comfy.conds.CONDCrossAttn(cache[id(prompt)])
            out.append(d)
        new_conds.append(out)
    return executor(model, new_conds, x_in, timestep, model_options)


def _legacy_wrapper(state, inner):
    """`model_function_wrapper` for hosts without keyed wrappers; chains the wrapper already set.
    A closure, not an object: that host deep-copies model_options on every clone."""
    def wrapper(apply_model, args):
        x, sigma, c, parts = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        ctx, b = c.get("c_crossattn"), x.shape[0] // len(parts)
        found = [(j, LEGACY.find(ctx[j * b])) for j, kind in enumerate(parts) if kind == 0] if ctx is not None else []
        found = [(j, p) for j, p in found if p is not None]
        if found:
            chunks = list(ctx.split(b))
            for j, prompt in found:
                words = state.words(apply_model.__self__, x[j * b:(j + 1) * b], sigma[j * b:(j + 1) * b])
                new = prompt.context(words, ctx.device).to(ctx.dtype)
                chunks[j] = new.repeat(1, ctx.shape[1] // new.shape[1], 1)
            args = {**args, "c": {**c, "c_crossattn": torch.cat(chunks)}}
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])
    return wrapper


def apply_e4t(model, clip, e4t: E4T, image, strength: float, t_stop: int, clip_vision=None):
    """A MODEL clone with E4T's weights patched in and the refinement wrapper installed."""
    check_model(model, clip, e4t)
    if clip_vision is not None:
        e4t.use_stock_backbone(clip_vision)
    if e4t.config.concept:
        warning = check_base(e4t.config, base_fingerprint(model))
        if warning:
            logging.warning("E4T: %s: %s", e4t.name, warning)
    features = e4t.features(image, comfy.model_management.get_torch_device())
    folded = e4t.weights.encoder.fold(type(features)(tokens=features.tokens.float().cpu()))
    tm = text_model(clip.cond_stage_model)
    e_domain = tm.embeddings.token_embedding.weight[domain_token(clip, e4t.config.domain_word)].detach().float().cpu()
    # the U-Net's down path sees the empty prompt of this CLIP (as in tuning); prompts use their own CLIP
    empty = clip.encode_from_tokens(clip.tokenize("")).detach().float().cpu()
    state = RefineState(folded, empty, e_domain, e4t.config.scale, float(t_stop))

    m = model.clone()
    add_e4t_patches(m, e4t.deltas(), e4t.weights.unet_delta, strength)
    m.e4t_state = state   # for the plot node on hosts without attachments (the same MODEL object reaches it)
    if WrappersMP is not None:
        head = comfy.model_patcher.ModelPatcher(folded, load_device=m.load_device, offload_device=m.offload_device)
        m.set_attachments(KEY, state)
        m.set_additional_models(KEY, [head])
        m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, KEY, _calc_cond_batch)
    else:
        m.set_model_unet_function_wrapper(_legacy_wrapper(state, m.model_options.get("model_function_wrapper")))
    return m
