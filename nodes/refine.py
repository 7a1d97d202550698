"""Applying E4T to a MODEL: offset patches plus the per-step refinement of placeholder prompts.

At every model evaluation the wrapper predicts w from the current noisy latent (the U-Net's own down
path with the empty prompt) and the cached concept-image features, re-encodes only the conditioning
made by "E4T Text Encode" with the CLIP wired into that node (its CLIP skip and LoRAs), and leaves every
other conditioning (negative prompt included) untouched.

With CFG and an empty negative prompt encoded by Apply E4T's CLIP, the negative's own U-Net pass sees the
latent, timestep and context of that down path: the feature pass's maps stand in for the negative rows' down
and middle blocks in the host's batched call (`e4t.KnownRows`, armed by an apply-model wrapper for that call
only), which computes those blocks for the other rows and its up path for all. Anything that could make that
pass differ from the feature pass (another context, ControlNet, U-Net patches or wrappers) leaves the call whole.
"""
import logging

import torch

import comfy.conds
import comfy.model_management
import comfy.model_patcher

from ..e4t import KnownRows, Refinement, base_fingerprint as fingerprint, check_base, unet_features
from .inputs import check_model
from .model import E4T
from .patches import PREFIX, add_e4t_patches, unpatched
from .prompt import LEGACY

try:
    import comfy.patcher_extension
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
        self.refinement = None

    def _refinement(self, x, folded=None) -> Refinement:
        if self.refinement is None or self.refinement.empty_context.device != x.device:
            self.refinement = Refinement(folded or self.folded.to(x.device), self.e_domain.to(x.device),
                                         self.empty_context.to(x.device), self.scale, self.t_stop)
        if folded is not None:
            self.refinement.encoder = folded
        return self.refinement

    def due(self, base_model, x, sigma, folded=None) -> bool:
        """Whether this evaluation predicts w afresh (not frozen below t_stop)."""
        return self._refinement(x, folded).due(base_model.model_sampling.timestep(sigma).float(), x.shape[0])

    def is_empty_context(self, context: torch.Tensor) -> bool:
        """Whether a conditioning's context is the encoder's empty context, value for value (then the
        host's pass with it computes exactly the feature pass's maps)."""
        empty = self.empty_context.to(context.device)
        return context.shape[1:] == empty.shape[1:] and \
            torch.equal(context.to(empty.dtype), empty.expand(context.shape[0], -1, -1))

    def words(self, base_model, x, sigma, folded=None, maps=None) -> torch.Tensor:
        """w (b, d) for the latents x at noise level sigma; maps: the down/mid outputs for them
        (`feature_maps`), else the feature pass runs inside the refinement."""
        refinement = self._refinement(x, folded)
        xs, t, dtype = _unet_input(base_model, x, sigma)
        return refinement(base_model.diffusion_model, xs, t, dtype, maps=maps)

    def feature_maps(self, base_model, x, sigma, folded=None) -> list:
        """The feature pass: the U-Net's down/mid outputs for x at sigma with the empty context, which are also
        those of an empty negative prompt's rows."""
        xs, t, dtype = _unet_input(base_model, x, sigma)
        return unet_features(base_model.diffusion_model, xs, t, self._refinement(x, folded).empty_context, dtype)


def _unet_input(base_model, x, sigma):
    """(scaled latent, timestep, dtype) the host's U-Net gets for x at sigma."""
    sampling = base_model.model_sampling
    dtype = getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()
    return sampling.calculate_input(sigma, x), sampling.timestep(sigma).float(), dtype


def refine_state(model):
    """The RefineState of a MODEL made by Apply E4T / E4T Personalize, or None."""
    if hasattr(model, "get_attachment") and model.get_attachment(KEY) is not None:
        return model.get_attachment(KEY)
    return getattr(model, "e4t_state", None)


def plain_run(transformer_options: dict, model_options: dict) -> bool:
    """Whether the host runs its U-Net's down and middle blocks unchanged: no patches (attention, block,
    ControlNet-free), no model wrappers other than E4T's own around the U-Net call."""
    if "model_function_wrapper" in model_options:
        return False
    if any(transformer_options.get("patches", {}).values()) or any(transformer_options.get("patches_replace", {}).values()):
        return False
    wrappers = transformer_options.get("wrappers", {})
    return WrappersMP is None or not any(any(wrappers.get(kind, {}).values())
                                         for kind in (WrappersMP.APPLY_MODEL, WrappersMP.DIFFUSION_MODEL))


# a negative conditioning whose pass equals the feature pass has nothing but its context
_PLAIN_COND_KEYS = {"cross_attn", "pooled_output", "model_conds", "uuid"}


def _shared_uncond(state, conds, model_options):
    """The index of the conditioning group whose host pass is the encoder's feature pass (CFG with an
    empty negative prompt from the same CLIP), or None: then the feature pass runs on its own."""
    if not plain_run(model_options.get("transformer_options", {}), model_options):
        return None
    for i, group in enumerate(conds):
        if group is None or len(group) != 1 or any(KEY in d for d in group):
            continue
        d = group[0]
        if set(d) - _PLAIN_COND_KEYS or set(d["model_conds"]) != {"c_crossattn"} or d.get("hooks") is not None:
            continue
        if state.is_empty_context(d["model_conds"]["c_crossattn"].cond):
            return i
    return None


def _refined(conds, words):
    """conds with new contexts for the conditionings that carry an E4T prompt (copied dicts)."""
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
    return new_conds


def _calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    """Keyed CALC_COND_BATCH wrapper: new contexts for conditionings that carry an E4T prompt.

    With an empty negative prompt (CFG) the feature pass's maps stand in for that prompt's down/mid blocks in
    the host's U-Net call (`_known_uncond`, an apply-model wrapper for this evaluation only)."""
    patcher = model.current_patcher
    state = patcher.get_attachment(KEY) if patcher is not None else None
    if state is None or not any(c is not None and any(KEY in d for d in c) for c in conds):
        return executor(model, conds, x_in, timestep, model_options)
    (head_patcher,) = patcher.get_additional_models_with_key(KEY)
    u = _shared_uncond(state, conds, model_options)
    if u is None or not state.due(model, x_in, timestep, head_patcher.model):
        words = state.words(model, x_in, timestep, head_patcher.model)
        return executor(model, _refined(conds, words), x_in, timestep, model_options)
    maps = state.feature_maps(model, x_in, timestep, head_patcher.model)
    words = state.words(model, x_in, timestep, head_patcher.model, maps=maps)
    options = comfy.patcher_extension.copy_nested_dicts(model_options)
    known = _known_uncond(state, maps, u, x_in, timestep)
    comfy.patcher_extension.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, known, options, is_model_options=True)
    return executor(model, _refined(conds, words), x_in, timestep, options)


def _known_uncond(state, maps, u, x_in, timestep):
    """APPLY_MODEL wrapper: in a U-Net call that batches conditioning group `u` (the empty negative prompt) with
    others, that group's rows are known at the down/mid blocks (`e4t.KnownRows`) once checked to be the feature
    pass's input: the same latent, noise level and empty context."""
    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        rows = _chunk_rows(transformer_options.get("cond_or_uncond", []), u, x.shape[0])
        known = None
        if rows is not None and c_concat is None and control is None and c_crossattn is not None \
                and torch.equal(x[rows], x_in) and torch.equal(t[rows], timestep) \
                and state.is_empty_context(c_crossattn[rows]):
            known = KnownRows.down_path(executor.class_obj.diffusion_model, maps, x.shape[0], rows).install()
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            if known is not None:
                known.remove()
    return wrapper


def _chunk_rows(parts: list, u: int, batch: int):
    """The rows of chunk `u` in a call batching the chunks `parts` (None: it is not there once beside others)."""
    if parts.count(u) != 1 or len(parts) < 2:
        return None
    b = batch // len(parts)
    return slice(parts.index(u) * b, (parts.index(u) + 1) * b)


def _legacy_wrapper(state, inner):
    """`model_function_wrapper` for hosts without keyed wrappers; chains the wrapper already set.
    A closure, not an object: that host deep-copies model_options on every clone.

    With an empty negative prompt in the batch, the feature pass's maps stand in for its rows' down/mid blocks
    (as `_calc_cond_batch`)."""
    def run(apply_model, args):
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def wrapper(apply_model, args):
        x, sigma, c, parts = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        ctx, b = c.get("c_crossattn"), x.shape[0] // len(parts)
        found = [(j, LEGACY.find(ctx[j * b])) for j, kind in enumerate(parts) if kind == 0] if ctx is not None else []
        found = [(j, p) for j, p in found if p is not None]
        if not found:
            return run(apply_model, args)
        base, rows = apply_model.__self__, lambda t, j: t[j * b:(j + 1) * b]
        u = _legacy_shared_uncond(state, inner, c, parts, x, b, found)
        maps = None
        if u is not None and state.due(base, rows(x, u), rows(sigma, u)):
            maps = state.feature_maps(base, rows(x, u), rows(sigma, u))
        chunks, found = list(ctx.split(b)), dict(found)
        for j, prompt in found.items():
            words = state.words(base, rows(x, j), rows(sigma, j), maps=maps)
            new = prompt.context(words, ctx.device).to(ctx.dtype)
            chunks[j] = new.repeat(1, ctx.shape[1] // new.shape[1], 1)
        known = None if maps is None else \
            KnownRows.down_path(base.diffusion_model, maps, x.shape[0], slice(u * b, (u + 1) * b)).install()
        try:
            return run(apply_model, {**args, "c": {**c, "c_crossattn": torch.cat(chunks)}})
        finally:
            if known is not None:
                known.remove()
    return wrapper


def _legacy_shared_uncond(state, inner, c, parts, x, b, found):
    """The batch chunk of an empty negative prompt whose pass is the feature pass (see `_shared_uncond`)."""
    if inner is not None or set(c) != {"c_crossattn", "transformer_options"} or parts.count(1) != 1 \
            or not plain_run(c["transformer_options"], {}):
        return None
    u = parts.index(1)
    x_u = x[u * b:(u + 1) * b]
    if not state.is_empty_context(c["c_crossattn"][u * b:(u + 1) * b]):
        return None
    return u if all(torch.equal(x[j * b:(j + 1) * b], x_u) for j, _ in found) else None


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
