"""Test helpers: tiny random-weight models of the real architectures (built by ComfyUI's own classes in
`e4t_standalone.comfy_models`), a tiny checkpoint in the published layout, small accessors."""
import json
import os
import sys

import torch

from e4t_standalone import comfy_models
from e4t_standalone.comfy_models import (CLIP_L, SD15_UNET, TINY_CLIP, TINY_UNET, TINY_VAE, comfy_root,  # noqa: F401
                                         tiny_vae)

# E4T_TEST_DEVICE=cuda runs the host tests on a GPU, with ComfyUI's dynamic VRAM where the tree has it
# (as its main.py enables it); E4T_TEST_DTYPE picks the U-Net's dtype there (fp16 as loaders choose).
GPU = os.environ.get("E4T_TEST_DEVICE", "cpu") == "cuda"
GPU_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[os.environ.get("E4T_TEST_DTYPE", "fp16")]


def import_comfy(root=None):
    """ComfyUI on sys.path and initialised: CPU mode, or with E4T_TEST_DEVICE=cuda the GPU as its main.py sets it up."""
    if not GPU or "comfy.model_management" in sys.modules:
        return comfy_models.import_comfy(root, cpu=not GPU)
    root = comfy_models.comfy_root(root)
    sys.path.append(root)
    try:
        import comfy_aimdo.control
    except ImportError:
        return comfy_models.import_comfy(root, cpu=False)      # a tree from before dynamic VRAM
    comfy_aimdo.control.init()
    comfy_models.import_comfy(root, cpu=False)
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    if comfy_aimdo.control.init_devices([(d.index, 0) for d in mm.get_all_torch_devices()]):
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return root


def dynamic_vram() -> bool:
    return bool(getattr(sys.modules.get("comfy.memory_management"), "aimdo_enabled", False))


def tiny_model(seed=0, unet_config=TINY_UNET, dtype=None, disable_dynamic=False):
    """The tiny MODEL: on the CPU, or built there and loaded to the GPU by the host's own patcher
    (weights in GPU_DTYPE unless `dtype` says otherwise)."""
    import_comfy()
    if not GPU:
        return comfy_models.tiny_model(seed, unet_config)
    import comfy.model_management as mm
    m = comfy_models.tiny_model(seed, unet_config, dtype=dtype or GPU_DTYPE, load_device=mm.get_torch_device(),
                                dynamic=not disable_dynamic)
    m.cached_patcher_init = (tiny_model, (seed, unet_config, dtype))   # as core loaders do: ComfyUI can rebuild it
    return m


def tiny_clip(seed=1, clip_config=TINY_CLIP, disable_dynamic=False):
    clip = comfy_models.tiny_clip(seed, clip_config, disable_dynamic)
    if GPU:
        clip.patcher.cached_patcher_init = (_clip_patcher, (seed, clip_config))
    return clip


def _clip_patcher(seed, clip_config, disable_dynamic=False):
    return tiny_clip(seed, clip_config, disable_dynamic).patcher


def text_model(clip):
    return clip.cond_stage_model.clip_l.transformer.text_model


def unet_channels():
    from e4t.encoder import unet_feature_channels
    return unet_feature_channels(TINY_UNET["model_channels"], TINY_UNET["channel_mult"], 2)


def tiny_encoder_config():
    from e4t import EncoderConfig
    return EncoderConfig(vit_width=80, vit_layers=2, vit_heads=1, vit_patch=8, image_size=32,
                         unet_dim=sum(unet_channels()), word_dim=TINY_CLIP["hidden_size"])


def write_published(folder, seed=3, config=True, with_unet=False):
    """A tiny checkpoint in the published mkshing layout, written with torch.save (fp32 pickles)."""
    from e4t import Encoder, Offsets, targets
    from e4t.offsets import to_published
    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    encoder = Encoder(tiny_encoder_config())
    model = tiny_model()
    offsets = Offsets(targets(model.model.diffusion_model.state_dict()), identity=False)
    torch.save(encoder.state_dict(), os.path.join(folder, "encoder.pt"))
    off = {k: v.clone() for k, v in to_published(offsets).items()}
    if with_unet:
        off.update({"conv_in.weight": torch.randn(32, 4, 3, 3)})
        torch.save(off, os.path.join(folder, "unet.pt"))
    else:
        torch.save(off, os.path.join(folder, "weight_offsets.pt"))
    if config:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"placeholder_token": "*s", "domain_class_token": "face", "domain_embed_scale": 0.1,
                       "clip_model_name_or_path": "ViT-H-14::laion2b_s32b_b79k",
                       "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5"}, f)
    return encoder, offsets
