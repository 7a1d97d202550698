"""Where E4T meets the webui's model: checks with clear messages, the parts of the loaded SD1 model
the engine needs, the placeholder embedding, and the few webui states that must be respected
(--medvram/--lowvram module swapping, the built-in Lora extension's in-place weights).
"""
import importlib.util
import sys

import torch

import e4t
from e4t import validate

FORGE_MESSAGE = ("E4T for Automatic1111 does not run on Forge: Forge replaces the webui's model stack "
                 "(no ldm U-Net, no textual-inversion hijack, its own LoRA patcher). Use A1111 1.10, or "
                 "the ComfyUI node pack of this project.")


class E4TError(RuntimeError):
    """A problem the user can fix; the message says what and how."""


def is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None


def opt(name, default):
    """A setting of the E4T section (defaults apply before the settings page was built)."""
    from modules import shared
    return getattr(shared.opts, name, default) if name in shared.opts.data_labels else default


def check_model(sd_model):
    """The loaded checkpoint must be a plain 4-channel SD 1.x model in the A1111 model stack."""
    if is_forge():
        raise E4TError(FORGE_MESSAGE)
    if sd_model is None:
        raise E4TError("no Stable Diffusion checkpoint is loaded")
    kind = "SDXL" if getattr(sd_model, "is_sdxl", False) else "SD 2.x" if getattr(sd_model, "is_sd2", False) \
        else type(sd_model).__name__
    name = getattr(getattr(sd_model, "sd_checkpoint_info", None), "name_for_extra", None) or "the loaded checkpoint"
    in_channels = 8 if getattr(sd_model, "cond_stage_key", "") == "edit" else sd_model.model.diffusion_model.in_channels
    try:
        validate.sd1_model(name, kind, bool(getattr(sd_model, "is_sd1", False)), in_channels)
    except validate.InputError as err:
        raise E4TError(str(err)) from None
    from modules import sd_unet
    if getattr(sd_unet, "current_unet", None) is not None:
        raise E4TError("E4T works on the webui's own U-Net; an alternative SD U-Net (e.g. TensorRT) is selected: "
                       "set Settings > Stable Diffusion > SD Unet to None to use E4T")


def check_fits(name: str, word_dim: int, unet_dim: int, changed: dict, sd_model) -> None:
    """E4T weights or a concept fit the loaded checkpoint (`e4t.validate.e4t_fits`)."""
    unet = sd_model.model.diffusion_model
    _, tm = text_model(sd_model)
    width = tm.embeddings.position_embedding.weight.shape[-1]
    channels = sum(e4t.unet_feature_channels(unet.model_channels, unet.channel_mult, unet.num_res_blocks[0]))
    model = getattr(getattr(sd_model, "sd_checkpoint_info", None), "name_for_extra", None) or "the loaded checkpoint"
    try:
        validate.e4t_fits(name, word_dim, unet_dim, changed, model, width, channels,
                          {k: v.shape for k, v in unet.state_dict().items()})
    except validate.InputError as err:
        raise E4TError(str(err)) from None


def safe_unpickle_reason(path: str) -> str:
    """Why the webui's safe-unpickle check refuses a file (the reason it otherwise prints only to the console)."""
    from modules import safe
    try:
        safe.check_pt(path, None)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "the check passed when run again"


def low_vram(sd_model) -> bool:
    return bool(getattr(sd_model, "lowvram", False))


def unet(sd_model):
    return sd_model.model.diffusion_model


def unet_on_device(sd_model):
    """Under --medvram the U-Net is moved to the GPU by a pre-hook on `sd_model.model`, which calling
    its blocks directly would bypass: run those hooks first. (--lowvram hooks every block itself.)"""
    if low_vram(sd_model):
        _send_to_gpu(sd_model.model)


def text_on_device(sd_model):
    """The same for the CLIP text transformer, whose layers the slot encoder calls directly."""
    if low_vram(sd_model):
        _send_to_gpu(sd_model.cond_stage_model.wrapped.transformer)


def _send_to_gpu(module):
    for hook in list(module._forward_pre_hooks.values()):
        if getattr(hook, "__name__", "") == "send_me_to_gpu":     # the webui's own; other extensions' hooks expect real inputs
            hook(module, ())


def text_model(sd_model):
    """(tokenizer, CLIP text transformer) under the webui's prompt wrapper."""
    wrapped = sd_model.cond_stage_model.wrapped
    return wrapped.tokenizer, wrapped.transformer.text_model


def token_ids(sd_model, text: str) -> list:
    tokenizer, _ = text_model(sd_model)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def single_token(sd_model, word: str) -> int:
    ids = token_ids(sd_model, word)
    if len(ids) != 1:
        raise E4TError(f"the domain word {word!r} is {len(ids)} CLIP tokens; it must be exactly one "
                       f"(e.g. face, cat, dog, painting)")
    return ids[0]


def input_embedding(sd_model, token_id: int) -> torch.Tensor:
    """The CLIP input embedding of one token, fp32 (e_domain for the domain word)."""
    _, tm = text_model(sd_model)
    table = tm.embeddings.token_embedding
    table = getattr(table, "wrapped", table)          # the webui wraps it in EmbeddingsWithFixes
    return table.weight[token_id].detach().float().clone()


def clip_layers(sd_model):
    """Transformer layers to run for the user's CLIP skip setting (`e4t.clip_layers`; skip 2 stops at layer -2)."""
    from modules import shared
    _, tm = text_model(sd_model)
    return e4t.clip_layers(len(tm.encoder.layers), -max(1, int(shared.opts.CLIP_stop_at_last_layers)))


def empty_context(sd_model) -> torch.Tensor:
    """The empty prompt through the webui's own path (CLIP skip applied): (1, 77, d)."""
    from modules import devices
    with torch.no_grad(), devices.autocast():
        return sd_model.get_learned_conditioning([""]).float()


def release_lora(sd_model) -> list:
    """Bring the built-in Lora extension to its no-LoRA state before E4T trains (the rule of both hosts,
    `e4t.base_weights_notice`): it restores its own weight backups, exactly what its next generation without
    a LoRA would do; a LoRA from the last generation is not baked into the concept, and no forward pass inside
    the tune makes Lora rewrite weights E4T trains on. Returns the names of the LoRAs it took off."""
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "network_apply_weights"):
        return []
    names = [getattr(net, "name", str(net)) for net in networks.loaded_networks]
    networks.loaded_networks.clear()
    with torch.no_grad():
        for module in sd_model.modules():
            if getattr(module, "network_current_names", ()):
                networks.network_apply_weights(module)
    return names


class Placeholder:
    """The placeholder word as a textual-inversion embedding of one vector, so the webui's own prompt
    path (AND, prompt editing, emphasis, CLIP skip, long prompts) puts `vec` at its position."""

    def __init__(self, sd_model, name: str, vec: torch.Tensor, filename: str = None):
        from modules import sd_hijack
        from modules.textual_inversion.textual_inversion import Embedding
        self.db, self.sd_model, self.name = sd_hijack.model_hijack.embedding_db, sd_model, name
        if not sd_model.cond_stage_model.tokenize([name])[0]:
            raise E4TError(f"the placeholder {name!r} is empty after tokenisation")
        self.previous = self.db.word_embeddings.get(name)       # a user embedding of the same name
        self.embedding = Embedding(vec.reshape(1, -1), name)
        self.embedding.vectors, self.embedding.shape = 1, vec.numel()
        self.embedding.filename = filename     # the extra-networks card reads it (None breaks the TI page)
        self.db.register_embedding(self.embedding, sd_model)

    def ensure(self):
        """Register again if an embeddings reload (e.g. the extra-networks refresh) dropped it mid-job."""
        if self.db.word_embeddings.get(self.name) is not self.embedding:
            current = self.db.word_embeddings.get(self.name)
            if current is not None:
                self.previous = current
            self.db.register_embedding(self.embedding, self.sd_model)

    def set(self, vec: torch.Tensor):
        self.embedding.vec = vec.reshape(1, -1)

    def remove(self):
        if self.db.word_embeddings.get(self.name) is self.embedding:
            self.db.register_embedding_by_name(None, self.sd_model, self.name)
            if self.previous is not None:
                self.db.register_embedding(self.previous, self.sd_model)


def base_fingerprint(unet) -> str:
    """The engine's fingerprint of the base U-Net, as the ComfyUI pack records it."""
    import e4t
    return e4t.base_fingerprint(unet.input_blocks[0][0].weight, unet.out[2].weight)


def clear_cond_caches(p):
    """Forget the webui's cached prompt conditionings (keyed by prompt text, not by embedding values)."""
    for attr in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        cache = getattr(p, attr, None)
        if isinstance(cache, list) and len(cache) == 2:
            cache[0] = cache[1] = None
