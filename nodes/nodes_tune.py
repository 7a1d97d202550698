"""E4T Personalize: tune encoder heads, offsets and U-Net on one concept image (paper §3.4)."""
import hashlib
import logging
import uuid

import torch

import comfy.model_base
import comfy.model_management
import comfy.utils

from .. import e4t as engine
from ..e4t import line_plot
from .model import E4T, image_sha256, image_to_engine, image_uint8
from .prompt import PlaceholderPrompt
from . import inputs
from .refine import apply_e4t, base_fingerprint, domain_token, text_model


def _send(event, data):
    """To the client that queued the prompt (progress of the tune node in web/e4t.js)."""
    try:
        from server import PromptServer
        PromptServer.instance.send_sync(event, data, PromptServer.instance.client_id)
    except (ImportError, AttributeError):
        pass


def _trainable(patcher, what):
    """Dynamic VRAM (ComfyUI 0.3x on NVIDIA) patches weights per call: training needs a copy with the patches
    baked in, which ComfyUI builds by reloading the model the way its loader did."""
    if not getattr(patcher, "is_dynamic", lambda: False)():
        return patcher
    if getattr(patcher, "cached_patcher_init", None) is None:
        raise ValueError(f"E4T Personalize: this {what} comes from a loader that ComfyUI cannot reload, and dynamic "
                         "VRAM needs that to make a trainable copy. Load it with a core loader (Load Checkpoint), "
                         "or start ComfyUI with --disable-dynamic-vram.")
    return patcher.get_non_dynamic_delegate()


def base_weights(patcher):
    """(a clone of `patcher` without weight patches, the patched keys): the tune starts from the checkpoint's own
    weights (`e4t.base_weights_notice` says why); the patches stay on the MODEL the node returns."""
    if not patcher.patches:
        return patcher, []
    base = patcher.clone()
    base.patches, base.patches_uuid = {}, uuid.uuid4()    # a new uuid: ComfyUI reloads the weights unpatched
    return base, list(patcher.patches)


def _tune_copies(model, clip):
    """The MODEL and CLIP patchers the tune loads: trainable under dynamic VRAM, without LoRAs (`base_weights`)."""
    (work, unet_patches), (clip_work, clip_patches) = (base_weights(_trainable(model, "MODEL")),
                                                       base_weights(_trainable(clip.patcher, "CLIP")))
    left_out = engine.base_weights_notice([f"LoRA or other patches on {len(keys)} {what} weights" for what, keys
                                           in (("MODEL", unet_patches), ("CLIP", clip_patches)) if keys])
    if left_out:
        logging.warning("%s", left_out)
    return work, clip_work


def _text_encoder(clip, tm, placeholder, device):
    """(text_encode(texts, words) for the tune, the empty prompt's context): the word at the placeholder, through the
    text model `tm` run on copies of its weights, with this CLIP's tokenizer and CLIP skip."""
    encode_ids = engine.WordInjector(tm, engine.clip_layers(len(tm.encoder.layers), clip.layer_idx)).on_copies(device)
    prompts = {}

    def text_encode(texts, words):
        ids, pos = zip(*(prompts.setdefault(t, PlaceholderPrompt(clip, t, placeholder)).first_chunk() for t in texts))
        return encode_ids(torch.stack(ids).to(device), words, torch.tensor(pos, device=device))

    with torch.no_grad():
        empty_ids, _ = PlaceholderPrompt(clip, "", placeholder).first_chunk()
        empty = encode_ids(empty_ids[None].to(device), None, torch.zeros(1, dtype=torch.long, device=device))
    return text_encode, empty


def _vae_encoder(work, vae, seed, device):
    """vae_encode(images in [-1, 1]) for the tune: the host's VAE, latents in the U-Net's space, seeded."""
    def vae_encode(images):
        with torch.inference_mode(), engine.seeded(seed, device):      # older hosts sample the posterior
            z = work.model.process_latent_in(vae.encode(((images + 1) / 2).movedim(1, -1)))
        return z.clone()
    return vae_encode


def _progress(steps, unique_id):
    """progress(step, total, loss): ComfyUI's progress bar and the tune node's loss display (web/e4t.js)."""
    pbar = comfy.utils.ProgressBar(steps)

    def progress(step, total, loss):
        pbar.update_absolute(step, total)
        _send("e4t.tune", {"node": unique_id, "step": step, "total": total, "loss": loss})
    return progress


def _concept(model, e4t, image, features, result, cfg, masked):
    """The tuned E4T: the engine's concept record with this host's metadata."""
    metadata = engine.concept_metadata(
        host="comfyui", source=e4t.name, source_sha256=engine.source_sha256(e4t.weights),
        image_sha256=image_sha256(image), base_fingerprint=base_fingerprint(model), tune=cfg, losses=result.losses,
        mask="node" if masked else None)
    return E4T(engine.make_concept(e4t.weights, result, tokens=features.tokens, image=image_uint8(image),
                                   metadata=metadata),
               f"{e4t.name} + {hashlib.sha256(metadata['image_sha256'].encode()).hexdigest()[:8]}")


def memory_mode(memory: str, device, trains: str = "all", batch_size: int = 16, resolution: int = 512) -> str:
    """The engine's rule for 'auto' (the fastest mode whose estimated peak fits the device), said before loading."""
    try:
        return engine.memory_mode(memory, device, None, trains, batch_size, resolution)
    except ValueError as err:
        raise ValueError(f"E4T Personalize: {err}") from None


LAMBDA_TOOLTIP = ("embedding regulariser λ of this tune (published 1e-4; paper, faces: 0.1). The E4T file's own "
                  "reg_lambda is the λ its encoder was pre-trained with and is not used for tuning")


class E4TPersonalize:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",), "e4t": ("E4T",), "image": ("IMAGE",),
                "steps": ("INT", {"default": 15, "min": 1, "max": 500, "tooltip": "paper: 15 for faces, 5 for cats/art"}),
                "batch_size": ("INT", {"default": 16, "min": 1, "max": 64, "tooltip": "the paper: 16 or more is crucial"}),
                "lr": ("FLOAT", {"default": 1.6e-5, "min": 0.0, "max": 1e-2, "step": 1e-7, "round": False}),
                "reg_lambda": ("FLOAT", {"default": engine.TuneConfig.reg_lambda, "min": 0.0, "max": 10.0, "step": 1e-5,
                                         "round": False, "tooltip": LAMBDA_TOOLTIP}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff}),
                "trains": (["all", "attention"], {"tooltip": "heads + offsets + the whole U-Net, or its attention only"}),
                "memory": (["auto", "fast", "low_vram"], {"default": "auto", "tooltip": "low_vram: the same recipe without fp32 copies: bf16 deltas on the model's frozen weights, recomputed activations, 8-bit Adam moments, the optimizer step inside backward; auto: the fastest mode whose estimated peak fits the device (fast about 49 GiB at batch 16, 512 px), else low_vram"}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 64}),
            },
            "optional": {"mask": ("MASK", {"tooltip": "restricts the loss to these pixels (e.g. the face)"})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL", "E4T", "IMAGE")
    RETURN_NAMES = ("model", "e4t", "loss_plot")
    FUNCTION = "personalize"
    CATEGORY = "E4T"
    DESCRIPTION = "Tunes E4T on one image in a few steps; returns the personalised model, the concept and the loss plot."

    def personalize(self, model, clip, vae, e4t, image, steps, batch_size, lr, reg_lambda, seed, trains, memory,
                    resolution, mask=None, unique_id=None):
        memory = memory_mode(memory, model.load_device, trains, batch_size, resolution)
        cfg = engine.TuneConfig(steps=steps, batch_size=batch_size, lr=lr, reg_lambda=reg_lambda, seed=seed,
                                trains=trains, resolution=resolution, **engine.memory_settings(memory),
                                prediction="v" if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION else "eps")
        image, engine_mask = inputs.tune_inputs(model, clip, e4t, image, mask, cfg)   # before any model is loaded
        work, clip_work = _tune_copies(model, clip)
        device = work.load_device
        features = e4t.features(image, device)
        e4t.release_vit()                 # the tune reads the cached features: 2.5 GB less on the GPU
        comfy.model_management.load_models_gpu([work, clip_work])
        unet = work.model.diffusion_model
        tm = text_model(clip_work.model)
        text_encode, empty = _text_encoder(clip, tm, e4t.config.placeholder, device)
        vae_encode = _vae_encoder(work, vae, seed, device)
        sampling = work.model.model_sampling
        progress = _progress(steps, unique_id)

        training = hasattr(comfy.model_management, "in_training")      # newer ComfyUI: ops take autograd-safe paths
        if training:
            comfy.model_management.in_training = True
        try:
            result = engine.tune(
                unet, e4t.weights.encoder, e4t.weights.offsets, image_to_engine(image).to(device), text_encode=text_encode,
                vae_encode=vae_encode, e_domain=tm.embeddings.token_embedding.weight[domain_token(clip, e4t.config.domain_word)],
                empty_context=empty, alphas_cumprod=engine.alphas_cumprod_of(sampling),
                scale=e4t.config.scale, placeholder=e4t.config.placeholder, cfg=cfg, mask=engine_mask, features=features,
                progress=progress, should_stop=comfy.model_management.processing_interrupted,
                precision=engine.training_precision(device, half=unet.dtype != torch.float32))
        except engine.Interrupted:
            raise comfy.model_management.InterruptProcessingException()
        except engine.Diverged as err:
            raise engine.Diverged(f"E4T Personalize: {err}") from None
        except torch.cuda.OutOfMemoryError as err:     # re-raised as itself: ComfyUI still frees its models
            peaks = {(m, t): engine.tune_peak(m, t, batch_size, resolution) / 2**30
                     for m, t in (("fast", "all"), ("low_vram", "all"), ("low_vram", "attention"))}
            raise torch.cuda.OutOfMemoryError(
                f"E4T Personalize ran out of GPU memory in {memory} mode; nothing was changed. Estimated peaks of this "
                f"tune (batch {batch_size}, {resolution} px): {peaks['fast', 'all']:.1f} GiB fast, "
                f"{peaks['low_vram', 'all']:.1f} GiB low_vram, {peaks['low_vram', 'attention']:.1f} GiB low_vram with "
                "trains: attention. Pick a mode that fits, or lower batch_size or resolution.") from err
        finally:
            if training:
                comfy.model_management.in_training = False

        tuned = _concept(model, e4t, image, features, result, cfg, engine_mask is not None)
        plot = line_plot(range(1, len(result.losses) + 1), result.losses, "E4T tuning loss", "step", "loss")
        return (apply_e4t(model, clip, tuned, None, 1.0, 0), tuned, plot[None])   # the saved tokens, as a reload uses
