"""The published E4T folder (mkshing/e4t-diffusion), read safely: `config.json`, `encoder.pt` (heads + ViT
under `clip_vision.*`), `weight_offsets.pt` or a tuned `unet.pt` (whose `wo_*` entries are the offsets).
`text_encoder.pt` is not read: E4T applies to the host's CLIP. Pickles are read with
`torch.load(weights_only=True)`, which cannot run code (`files.read_pickle`).
"""
import os
import re
import warnings
from dataclasses import asdict

from .encoder import EncoderConfig
from .files import E4TFileError, read_json, read_pickle
from .offsets import from_published
from .weights import STOCK_BACKBONE, DomainConfig, E4TWeights, build_encoder

PUBLISHED_FIX = "download it again (mkshing/e4t-diffusion on Hugging Face)"

# open_clip's ViTs: head width 64 but for these families (model_configs/*.json `head_width`), and heads by width
HEAD_WIDTH = {"H": 80, "g": 88, "bigG": 104, "e": 112}
VIT_HEADS = {384: 6, 512: 8, 768: 12, 896: 14, 1024: 16, 1280: 16, 1408: 16, 1664: 16, 1792: 16}


def vit_heads(width: int, backbone_id: str = STOCK_BACKBONE) -> int:
    """Attention heads of an open_clip ViT of this width: from the family its name gives (`ViT-H-14/...`, the
    published config's `clip_model_name_or_path`; the stock ViT-H when the folder does not say), else from the
    widths of open_clip's ViTs. The tensors hold no head count, and a wrong one gives wrong tokens silently."""
    family = re.search(r"ViT-(bigG|[SMBLHge])-", backbone_id or "")
    if family and width % HEAD_WIDTH.get(family[1], 64) == 0:
        return width // HEAD_WIDTH.get(family[1], 64)
    if width in VIT_HEADS:
        return VIT_HEADS[width]
    raise E4TFileError(f"encoder: a ViT of width {width} is not one of open_clip's ViTs "
                       f"({', '.join(map(str, VIT_HEADS))}) and its backbone {backbone_id!r} names no ViT family whose "
                       f"head width divides it: set clip_model_name_or_path in config.json to the open_clip model "
                       f"(e.g. ViT-H-14::laion2b_s32b_b79k)")


def infer_encoder_config(sd: dict, backbone_id: str = STOCK_BACKBONE) -> EncoderConfig:
    """Sizes from the tensors of `encoder.pt` themselves; the head count from the backbone's name (`vit_heads`)."""
    def get(key):
        if key not in sd:
            raise E4TFileError(f"encoder: missing key {key!r}: is this an E4T encoder file?")
        return sd[key]
    conv = get("clip_vision.conv1.weight")                        # (width, 3, patch, patch)
    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((get("clip_vision.positional_embedding").shape[0] - 1) ** 0.5))
    layers = len({k.split(".")[3] for k in sd if k.startswith("clip_vision.transformer.resblocks.")})
    return EncoderConfig(vit_width=width, vit_layers=layers, vit_heads=vit_heads(width, backbone_id), vit_patch=patch,
                         image_size=grid * patch, unet_dim=get("unet_feature_embedder.0.weight").shape[1],
                         word_dim=get("final_linear.weight").shape[0])


def read_published_config(folder: str) -> DomainConfig:
    """Tolerant `config.json` reading (full, trimmed or tuning-run with nested `pretrained_args`)."""
    path = os.path.join(folder, "config.json")
    data = {}
    if os.path.exists(path):
        data = read_json(path, PUBLISHED_FIX)
        data = {**data, **(data.get("pretrained_args") or {})}   # pretraining values win, as in the reference
    cfg = DomainConfig()
    cfg.placeholder = data.get("placeholder_token", cfg.placeholder)
    cfg.domain_word = data.get("domain_class_token", cfg.domain_word)
    cfg.scale = float(data.get("domain_embed_scale", cfg.scale))
    cfg.reg_lambda = float(data.get("reg_lambda", cfg.reg_lambda))
    clip_name = data.get("clip_model_name_or_path")
    if clip_name:
        cfg.backbone_id = clip_name.replace("::", "/")
    return cfg


def load_published(folder: str) -> E4TWeights:
    """Read a published E4T folder; the ViT comes from `encoder.pt` (it is part of the trained model)."""
    cfg = read_published_config(folder)
    enc_path = os.path.join(folder, "encoder.pt")
    if not os.path.exists(enc_path):
        raise E4TFileError(f"{folder}: no encoder.pt; an E4T folder holds encoder.pt, weight_offsets.pt "
                           f"(or unet.pt) and config.json")
    enc_sd = read_pickle(enc_path, PUBLISHED_FIX)
    enc_cfg = infer_encoder_config(enc_sd, backbone_id=cfg.backbone_id)
    cfg.encoder = asdict(enc_cfg)
    encoder = build_encoder(enc_cfg, enc_sd)
    if os.path.exists(os.path.join(folder, "weight_offsets.pt")):
        off_sd = read_pickle(os.path.join(folder, "weight_offsets.pt"), PUBLISHED_FIX)
    elif os.path.exists(os.path.join(folder, "unet.pt")):
        unet_sd = read_pickle(os.path.join(folder, "unet.pt"), PUBLISHED_FIX)
        off_sd = {k: v for k, v in unet_sd.items() if ".wo_" in k}
        warnings.warn(f"{folder}/unet.pt: its offsets are used; its tuned U-Net weights (diffusers layout, "
                      f"{len(unet_sd) - len(off_sd)} tensors) are not applied: re-tune the concept with this "
                      f"extension to get a concept file with its U-Net changes")
        del unet_sd
    else:
        raise E4TFileError(f"{folder}: neither weight_offsets.pt nor unet.pt found")
    if os.path.exists(os.path.join(folder, "text_encoder.pt")):      # not read: nothing here uses a tuned CLIP
        warnings.warn(f"{folder}/text_encoder.pt is not used: E4T applies to the CLIP of your checkpoint")
    offsets = from_published(off_sd).requires_grad_(False).eval()
    return E4TWeights(config=cfg, encoder=encoder, offsets=offsets)
