"""E4T Personalize: tune encoder heads, offsets and U-Net on one concept image (paper §3.4)."""
import hashlib
from dataclasses import asdict

import torch

import comfy.model_base
import comfy.model_management
import comfy.utils

from .. import e4t as engine
from ..e4t import DomainConfig, E4TWeights, line_plot
from ..e4t_standalone.comfy_models import in_place_residuals
from .model import E4T, image_sha256, image_to_engine, image_uint8
from .prompt import PlaceholderPrompt
from . import inputs
from .refine import apply_e4t, base_fingerprint, domain_token, text_model


def _n_layers(clip, tm):
    idx = clip.layer_idx
    if idx is None:
        return None
    return (len(tm.encoder.layers) + idx + 1) if idx < 0 else idx + 1


def _autocast_dtype(device):
    """bf16 autocast on GPUs that have it, fp16 on older CUDA GPUs; elsewhere fp32 training."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _send(event, data):
    """To the client that queued the prompt (progress of the tune node in web/e4t.js)."""
    try:
        from server import PromptServer
        PromptServer.instance.send_sync(event, data, PromptServer.instance.client_id)
    except (ImportError, AttributeError):
        pass


def _rounded(weights: E4TWeights, dtype=torch.float16) -> E4TWeights:
    """Round a tuned concept to its file precision, so the returned MODEL is exactly what a save reloads."""
    cast = lambda m: m.to(dtype).float()
    weights.unet_delta = {k: v.to(dtype) for k, v in weights.unet_delta.items()}
    weights.concept_tokens = weights.concept_tokens.to(dtype)
    for p in weights.encoder.heads():
        p.data = p.data.to(dtype).float()
    cast(weights.offsets)
    return weights


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


FAST_MODE_GIB = 46     # a batch-16 fast tune peaked at 44.6 GiB on an H100 (BENCHMARKS.md), plus the host's models


def memory_mode(memory: str, device) -> str:
    """'auto' picks fast where the device holds the fast mode's measured peak, else low_vram."""
    if memory != "auto":
        return memory
    if torch.device(device).type == "cpu":
        return "fast"
    return "fast" if comfy.model_management.get_total_memory(device) >= FAST_MODE_GIB * 2**30 else "low_vram"


class E4TPersonalize:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",), "e4t": ("E4T",), "image": ("IMAGE",),
                "steps": ("INT", {"default": 15, "min": 1, "max": 500, "tooltip": "paper: 15 for faces, 5 for cats/art"}),
                "batch_size": ("INT", {"default": 16, "min": 1, "max": 64, "tooltip": "the paper: 16 or more is crucial"}),
                "lr": ("FLOAT", {"default": 1.6e-5, "min": 0.0, "max": 1e-2, "step": 1e-7, "round": False}),
                "reg_lambda": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 10.0, "step": 1e-5, "round": False,
                                         "tooltip": "embedding regulariser λ (published 1e-4; paper face 0.1)"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff}),
                "trains": (["all", "attention"], {"tooltip": "heads + offsets + the whole U-Net, or its attention only"}),
                "memory": (["auto", "fast", "low_vram"], {"default": "auto", "tooltip": "low_vram: gradient checkpointing, micro-batches of 4 (same loss) and Adam's moments stored in bf16; auto: fast where the GPU has 46 GiB or more, else low_vram"}),
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
        memory = memory_mode(memory, model.load_device)
        cfg = engine.TuneConfig(steps=steps, batch_size=batch_size, lr=lr, reg_lambda=reg_lambda, seed=seed,
                                trains=trains, resolution=resolution, **engine.memory_settings(memory, batch_size),
                                prediction="v" if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION else "eps")
        image, engine_mask = inputs.tune_inputs(model, clip, e4t, image, mask, cfg)   # before any model is loaded
        work, clip_work = _trainable(model, "MODEL"), _trainable(clip.patcher, "CLIP")
        device = work.load_device
        features = e4t.features(image, device)
        e4t.release_vit()                 # the tune reads the cached features: 2.5 GB less on the GPU
        comfy.model_management.load_models_gpu([work, clip_work])
        unet = work.model.diffusion_model
        tm = text_model(clip_work.model)
        placeholder = e4t.config.placeholder

        encode_ids = engine.WordInjector(tm, _n_layers(clip, tm)).on_copies(device)
        prompts = {}

        def text_encode(texts, words):
            ids, pos = zip(*(prompts.setdefault(t, PlaceholderPrompt(clip, t, placeholder)).first_chunk() for t in texts))
            return encode_ids(torch.stack(ids).to(device), words, torch.tensor(pos, device=device))

        def vae_encode(images):
            with torch.inference_mode(), engine.seeded(seed, device):      # older hosts sample the posterior
                z = work.model.process_latent_in(vae.encode(((images + 1) / 2).movedim(1, -1)))
            return z.clone()

        with torch.no_grad():
            empty_ids, _ = PlaceholderPrompt(clip, "", placeholder).first_chunk()
            empty = encode_ids(empty_ids[None].to(device), None, torch.zeros(1, dtype=torch.long, device=device))
        sampling = work.model.model_sampling
        pbar = comfy.utils.ProgressBar(steps)

        def progress(step, total, loss):
            pbar.update_absolute(step, total)
            _send("e4t.tune", {"node": unique_id, "step": step, "total": total, "loss": loss})

        training = hasattr(comfy.model_management, "in_training")      # newer ComfyUI: ops take autograd-safe paths
        if training:
            comfy.model_management.in_training = True
        try:
            result = engine.tune(
                unet, e4t.weights.encoder, e4t.weights.offsets, image_to_engine(image).to(device), text_encode=text_encode,
                vae_encode=vae_encode, e_domain=tm.embeddings.token_embedding.weight[domain_token(clip, e4t.config.domain_word)],
                empty_context=empty, alphas_cumprod=engine.alphas_cumprod_of(sampling),
                scale=e4t.config.scale, placeholder=placeholder, cfg=cfg, mask=engine_mask, features=features,
                progress=progress, should_stop=comfy.model_management.processing_interrupted,
                autocast_dtype=_autocast_dtype(device),
                clone_norm_inputs=in_place_residuals())
        except engine.Interrupted:
            raise comfy.model_management.InterruptProcessingException()
        except torch.cuda.OutOfMemoryError as err:     # re-raised as itself: ComfyUI still frees its models
            raise torch.cuda.OutOfMemoryError(
                f"E4T Personalize ran out of GPU memory in {memory} mode; nothing was changed. Measured peaks of a "
                "batch-16 tune: 44.6 GiB fast, 22.9 GiB low_vram, 15.1 GiB low_vram with trains: attention. Pick "
                "those, or lower batch_size or resolution.") from err
        finally:
            if training:
                comfy.model_management.in_training = False

        config = DomainConfig.from_json(asdict(e4t.config))
        config.concept = {"image_sha256": image_sha256(image), "base_fingerprint": base_fingerprint(model),
                          "source": e4t.name, "losses": result.losses, **{k: v for k, v in asdict(cfg).items()
                                                                           if k not in ("templates",)}}
        tuned = E4T(_rounded(E4TWeights(config=config, encoder=result.encoder.cpu(), offsets=result.offsets.cpu(),
                                         unet_delta={k: v.cpu() for k, v in result.unet_delta.items()},
                                         concept_tokens=features.tokens.detach().cpu(), concept_image=image_uint8(image))),
                    f"{e4t.name} + {hashlib.sha256(config.concept['image_sha256'].encode()).hexdigest()[:8]}")
        plot = line_plot(range(1, len(result.losses) + 1), result.losses, "E4T tuning loss", "step", "loss")
        return (apply_e4t(model, clip, tuned, None, 1.0, 0), tuned, plot[None])   # the saved tokens, as a reload uses
