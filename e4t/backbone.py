"""The encoder's ViT backbone (open_clip names) from any CLIP-vision file, and where two backbones differ.

E4T fine-tunes nothing of the ViT it was pre-trained with, so a converted file may leave it out and take
a stock file instead, but only one proven equal to it (`weights_file.convert`, by `first_difference`
and then `hashing.tensors_sha256`).
"""
import torch

from .files import E4TFileError

_VIT_ROOTS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")


def backbone_state(sd: dict) -> dict:
    """A ViT visual tower in open_clip names from an open_clip checkpoint (`visual.*`), a bare
    VisionTransformer state dict, a published `encoder.pt` (`clip_vision.*`) or a Hugging Face /
    ComfyUI CLIP-vision file (`vision_model.*`); the projection is dropped."""
    for prefix in ("clip_vision.", "visual.", ""):
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if "conv1.weight" in sub:
            return {k: v for k, v in sub.items() if k.split(".")[0] in _VIT_ROOTS}
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        return _backbone_from_hf(sd)
    raise E4TFileError("not a CLIP vision file: expected open_clip `visual.conv1.weight` or Hugging Face "
                       "`vision_model.embeddings.patch_embedding.weight`")


def _backbone_from_hf(sd: dict) -> dict:
    """Hugging Face CLIPVisionModel names -> open_clip VisionTransformer names (q/k/v fused)."""
    p = "vision_model."
    out = {"conv1.weight": sd[p + "embeddings.patch_embedding.weight"],
           "class_embedding": sd[p + "embeddings.class_embedding"],
           "positional_embedding": sd[p + "embeddings.position_embedding.weight"]}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = sd[f"{p}{theirs}.{kind}"]
    n = len({k.split(".")[3] for k in sd if k.startswith(p + "encoder.layers.")})
    for i in range(n):
        hf, oc = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat([sd[hf + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[oc + f"{ours}.{kind}"] = sd[hf + f"{theirs}.{kind}"]
    return out


def first_difference(ours: dict, stock: dict) -> str | None:
    """Name of the first tensor (sorted) that differs between two backbones, or None if all equal."""
    for key in sorted(set(ours) | set(stock)):
        if key not in ours or key not in stock:
            return f"{key} (present in only one file)"
        if ours[key].shape != stock[key].shape or not torch.equal(ours[key].float(), stock[key].float()):
            return key
    return None
