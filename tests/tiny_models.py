"""Test helpers: tiny random-weight models of the real architectures (built by ComfyUI's own classes in
`e4t_standalone.comfy_models`), a tiny checkpoint in the published layout, small accessors."""
import json
import os

import torch

from e4t_standalone.comfy_models import (CLIP_L, SD15_UNET, TINY_CLIP, TINY_UNET, TINY_VAE, comfy_root,  # noqa: F401
                                         import_comfy, tiny_clip, tiny_model, tiny_vae)


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
