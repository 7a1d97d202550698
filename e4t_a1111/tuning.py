"""The E4T tab's tune: one image -> a personalised concept file, with the webui's loaded SD1 model.

The engine's `e4t.tune` trains copies (heads, offsets, U-Net weights substituted for each step), so
the webui's model is never changed. This module supplies what it needs from the webui: the U-Net,
a differentiable text encoder with the word at a one-token marker (the webui's own CLIP, CLIP skip
as set), the VAE encoder the user selected, the noise schedule; and it saves the result in the
format and metadata schema the ComfyUI pack writes and reads (`e4t.make_concept`, `e4t.save`).
"""
import os
import re
from dataclasses import replace

import numpy as np
import torch

import e4t

from . import host, store
from .host import E4TError



MASK_FIX = "paint the concept white in the mask"


def checked(fn, *args, **kwargs):
    """An `e4t.validate` check whose refusal the tab shows as an E4TError."""
    try:
        return fn(*args, **kwargs)
    except e4t.validate.InputError as err:
        raise E4TError(str(err)) from None


def image_tensor(image) -> torch.Tensor:
    """PIL image (any mode; alpha dropped, grey to RGB) -> (3, H, W) in [-1, 1], checked by `e4t.validate.image`."""
    if image is None:
        raise E4TError("upload the concept image first")
    rgb = checked(e4t.validate.image, e4t.pil_to_tensor(image).permute(1, 2, 0), "concept image")
    return rgb.permute(2, 0, 1) * 2 - 1


def mask_tensor(mask, size) -> torch.Tensor | None:
    """PIL mask -> (H, W) in [0, 1] at the image's (W, H) `size` (white = the concept), checked by
    `e4t.validate.mask` (the empty-mask rule of both hosts); None stays None."""
    if mask is None:
        return None
    t = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return checked(e4t.validate.mask, t, (size[1], size[0]), MASK_FIX, "mask")


def automatic_mask(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (H, W) mask around the largest `kind` (face, cat) OpenCV finds."""
    try:
        return e4t.detect_mask((pixels.permute(1, 2, 0) + 1) / 2, kind)
    except (e4t.MaskUnavailable, ValueError) as err:       # no OpenCV, nothing found, unknown kind
        raise E4TError(f"automatic {kind} mask: {err}") from None


def image_sha256(image) -> str:
    """Of the (H, W, 3) uint8 pixels: the hash the ComfyUI pack records for a concept image."""
    return e4t.pixels_sha256(e4t.pil_pixels(image))


def text_encoder(sd_model, device):
    """text_encode(prompts, words) for e4t.tune: the webui's CLIP, w at the marker, CLIP skip applied."""
    from modules import sd_hijack
    tokenizer, tm = host.text_model(sd_model)
    marker = next((w for w in e4t.MARKERS if len(host.token_ids(sd_model, w)) == 1), None)
    if marker is None:
        raise E4TError("no one-token marker word in this CLIP vocabulary")
    marker_id = host.token_ids(sd_model, marker)[0]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    n_layers = host.clip_layers(sd_model)

    def encode(prompts, words):
        rows = []
        for text in prompts:
            ids = [bos] + host.token_ids(sd_model, text)[:75] + [eos]
            rows.append(ids + [eos] * (77 - len(ids)))         # SD1 pads with the end token, as the webui
        ids = torch.tensor(rows, device=device)
        position = (ids == marker_id).int().argmax(dim=1)
        sd_hijack.model_hijack.fixes = None                    # no textual-inversion splice left over
        return e4t.encode_with_word(tm, ids, words, position, n_layers)

    return encode, marker


def tune(weights_name: str, image, mask, domain_word: str, concept_name: str, cfg: e4t.TuneConfig,
         overwrite: bool = False, progress=None, should_stop=None, auto_mask: str = "none", notice=None):
    """Tune and save; returns (path of the saved concept, losses). Raises E4TError or e4t.Interrupted.
    notice(line): told what the tune left out (`e4t.base_weights_notice`), besides the console.

    auto_mask: "none", or a kind of `e4t.CASCADES` ("face", "cat") to find the mask with OpenCV when no
    mask is given; nothing found (or no OpenCV) is an E4TError before anything is loaded or trained."""
    from modules import devices, shared

    sd_model = shared.sd_model
    host.check_model(sd_model)
    checked(e4t.validate.tune_config, cfg)                   # inputs checked before anything is loaded
    if host.low_vram(sd_model):
        raise E4TError("tuning needs the whole U-Net on the GPU and does not run with --medvram or --lowvram; "
                       "restart the webui without them to tune (sampling with a concept works with them)")
    concept_name = (concept_name or "").strip().replace("\\", "/").strip("/")
    if not re.fullmatch(r"[\w\- .]+(/[\w\- .]+)*", concept_name) or ".." in concept_name.split("/"):
        raise E4TError(f"give the concept a name of letters, digits, '-', '_' and '.' (sub-folders with '/'), "
                       f"not {concept_name!r}")
    if any(part.startswith(".") for part in concept_name.split("/")):
        raise E4TError(f"a concept name may not start with '.' (such files and folders are hidden): {concept_name!r}")
    out = os.path.join(store.folder(), concept_name + ".safetensors")
    if os.path.exists(out) and not overwrite:
        raise E4TError(f"{out} exists: choose another name or tick 'overwrite'")
    if os.path.exists(out) and store.kind(out) != store.CONCEPT:
        raise E4TError(f"{out} is not a concept (E4T weights or another file): 'overwrite' replaces concepts only; "
                       f"choose another name")
    pixels = image_tensor(image)
    mask_t, mask_source = mask_tensor(mask, image.size), "uploaded"
    if mask_t is None and auto_mask and auto_mask != "none":
        mask_t, mask_source = automatic_mask(pixels, auto_mask), auto_mask
    path = store.path_of(weights_name, store.WEIGHTS)
    weights = store.load(path, keep=host.opt("e4t_keep_weights_loaded", True))
    if weights.encoder.clip_vision.conv1.weight.is_meta:
        raise E4TError(f"{weights_name} carries no ViT backbone (converted with --stock-backbone): convert the "
                       f"published folder again without --stock-backbone to tune from it")
    host.check_fits(weights_name, weights.encoder.cfg.word_dim, weights.encoder.cfg.unet_dim,
                    e4t.validate.changed_shapes(weights), sd_model)
    domain_word = (domain_word or weights.config.domain_word).strip()
    token = host.single_token(sd_model, domain_word)

    cfg = replace(cfg, prediction=sd_model.parameterization)
    device = devices.device
    unet = host.unet(sd_model)
    left_out = e4t.base_weights_notice([f"LoRA {name!r}" for name in host.release_lora(sd_model)])
    if left_out:
        print(left_out)
        if notice is not None:
            notice(left_out)
    encoder = weights.encoder                  # stays on the CPU: the tune copies its heads to the GPU
    try:
        encoder.clip_vision.to(device, torch.float32 if device.type == "cpu" else devices.dtype)
        with torch.no_grad():
            features = encoder.image_features(pixels[None].to(device))
        encoder.clip_vision.to("cpu")           # the ViT is not needed while tuning: 1.3-2.5 GB less on the GPU
        devices.torch_gc()

        def vae_encode(images):
            x = images.to(device, devices.dtype_vae)
            with e4t.seeded(cfg.seed, device):                 # the webui samples the posterior from the global RNG
                return sd_model.get_first_stage_encoding(sd_model.encode_first_stage(x)).float()

        text_encode, marker = text_encoder(sd_model, device)
        result = e4t.tune(unet, encoder, weights.offsets, pixels, text_encode=text_encode,
                          vae_encode=vae_encode, e_domain=host.input_embedding(sd_model, token),
                          empty_context=host.empty_context(sd_model), alphas_cumprod=sd_model.alphas_cumprod.float(),
                          scale=weights.config.scale, placeholder=marker,
                          cfg=cfg, mask=mask_t, features=features,
                          progress=progress, should_stop=should_stop,
                          precision=e4t.training_precision(device, half=devices.dtype_unet != torch.float32))
        metadata = e4t.concept_metadata(
            host="a1111", source=weights_name, source_sha256=e4t.source_sha256(weights),
            image_sha256=image_sha256(image), base_fingerprint=host.base_fingerprint(unet),
            base_model=getattr(sd_model.sd_checkpoint_info, "name_for_extra", ""), tune=cfg, losses=result.losses,
            mask=mask_source if mask_t is not None else None)
        concept = e4t.make_concept(weights, result, tokens=features.tokens, image=e4t.pil_pixels(image),
                                   metadata=metadata, domain_word=domain_word)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        e4t.save(concept, out)
        return out, result.losses
    finally:
        weights.encoder.to("cpu")
        weights.offsets.to("cpu")
        devices.torch_gc()
