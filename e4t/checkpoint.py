"""E4T weight files: the published `.pt` folders (read safely) and our one-file `.safetensors` format.

Published folder (mkshing/e4t-diffusion): `config.json`, `encoder.pt` (heads + ViT under
`clip_vision.*`), `weight_offsets.pt` or a tuned `unet.pt` (whose `wo_*` entries are the offsets),
optional `text_encoder.pt` (not read: E4T applies to the host's CLIP). Pickles are read with `torch.load(weights_only=True)`, which cannot run code.

Our format: one `.safetensors` file; tensors `encoder.<published key>`, `offsets.<published key>`,
for a personalised concept also `unet_delta.<CompVis key>`, `concept.tokens`, `concept.image`;
JSON metadata under the key `e4t` (see `DomainConfig`). Written atomically, fp16 by default.
"""
import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from . import validate
from .encoder import Encoder, EncoderConfig
from .files import (E4TFileError, read_json, read_pickle, read_safetensors, read_tensors,
                    safetensors_metadata)
from .offsets import Offsets, from_published, load_checked, to_published

FORMAT_VERSION = 1                 # E4T weights; personalised concepts are format 2 (concept.py)
CONCEPT_FORMAT_VERSION = 2
ARCHITECTURE = "e4t-v1"            # published layout: ViT tokens + U-Net maps heads, rank-3 q/k/v offsets
STOCK_BACKBONE = "ViT-H-14/laion2b_s32b_b79k"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class DomainConfig:
    domain_word: str = "face"
    placeholder: str = "*s"
    scale: float = 0.1                 # s in w = e_domain + s E
    reg_lambda: float = 0.01           # λ the encoder was PRE-trained with (PretrainConfig's): a record; tunes use TuneConfig's
    base: str = "sd1"
    backbone_id: str = STOCK_BACKBONE
    backbone_included: bool = True
    backbone_sha256: str = ""          # of the backbone tensors, when a stock file may stand in
    encoder: dict = field(default_factory=lambda: asdict(EncoderConfig()))
    concept: dict = field(default_factory=dict)   # for personalised concepts: image/base hashes, tune settings

    @classmethod
    def from_json(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class E4TWeights:
    config: DomainConfig
    encoder: Encoder
    offsets: Offsets
    unet_delta: dict = field(default_factory=dict)     # CompVis names -> W_tuned - W0
    concept_tokens: torch.Tensor | None = None         # cached ViT tokens of the concept image
    concept_image: torch.Tensor | None = None          # (H, W, 3) uint8
    packed: dict | None = None                         # a concept's file tensors (compressed deltas; see concept.py)
    heads_sha256: str = ""                             # cache of concept.source_sha256


# --- safe reading ---------------------------------------------------------------------------------

PUBLISHED_FIX = "download it again (mkshing/e4t-diffusion on Hugging Face)"
OURS_FIX = "copy it again, or make it again (`python -m e4t convert` for E4T weights, a new tune for a concept)"


def load_pickled_state_dict(path: str) -> dict:
    """A file of a published folder, read safely (see `files.read_pickle`)."""
    return read_pickle(path, PUBLISHED_FIX)


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


def infer_encoder_config(sd: dict, prefix: str = "", backbone_id: str = STOCK_BACKBONE) -> EncoderConfig:
    """Sizes from the tensors themselves; the head count from the backbone's name (`vit_heads`)."""
    def get(key):
        if prefix + key not in sd:
            raise E4TFileError(f"encoder: missing key {key!r}: is this an E4T encoder file?")
        return sd[prefix + key]
    conv = get("clip_vision.conv1.weight")                        # (width, 3, patch, patch)
    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((get("clip_vision.positional_embedding").shape[0] - 1) ** 0.5))
    layers = len({k.split(".")[3] for k in sd if k.startswith(prefix + "clip_vision.transformer.resblocks.")})
    return EncoderConfig(vit_width=width, vit_layers=layers, vit_heads=vit_heads(width, backbone_id), vit_patch=patch,
                         image_size=grid * patch, unet_dim=get("unet_feature_embedder.0.weight").shape[1],
                         word_dim=get("final_linear.weight").shape[0])


def build_encoder(cfg: EncoderConfig, state: dict) -> Encoder:
    """An Encoder holding exactly these tensors (built on the meta device: no random init, no copy).
    Without any `clip_vision.*` tensor the backbone stays on the meta device: such an encoder works
    only from cached image tokens (a saved concept)."""
    encoder = Encoder(cfg, device="meta")
    if not any(k.startswith("clip_vision.") for k in state):
        heads = nn.ModuleDict({k: v for k, v in encoder.named_children() if k != "clip_vision"})
        load_checked(heads, state, "encoder", assign=True)
    else:
        load_checked(encoder, state, "encoder", assign=True)
    return encoder.requires_grad_(False).eval()


def pixels_sha256(pixels: torch.Tensor) -> str:
    """The concept-image hash both hosts record in a concept file: of its (h, w, 3) uint8 pixels."""
    return hashlib.sha256(pixels.to("cpu", torch.uint8).contiguous().numpy().tobytes()).hexdigest()


def tensors_sha256(state: dict) -> str:
    """A hash of tensors by name, shape and fp16 value (the precision E4T files and hosts keep a backbone
    in): equal hashes prove the weights equal at that precision."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float16).contiguous()
        h.update(f"{key}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


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


# --- the published folder -------------------------------------------------------------------------

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
    enc_sd = load_pickled_state_dict(enc_path)
    enc_cfg = infer_encoder_config(enc_sd, backbone_id=cfg.backbone_id)
    cfg.encoder = asdict(enc_cfg)
    encoder = build_encoder(enc_cfg, enc_sd)
    if os.path.exists(os.path.join(folder, "weight_offsets.pt")):
        off_sd = load_pickled_state_dict(os.path.join(folder, "weight_offsets.pt"))
    elif os.path.exists(os.path.join(folder, "unet.pt")):
        unet_sd = load_pickled_state_dict(os.path.join(folder, "unet.pt"))
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


# --- our format -----------------------------------------------------------------------------------

def save(weights: E4TWeights, path: str, dtype: str = "fp16", include_backbone: bool = True):
    """Write one `.safetensors` file atomically (temporary file in the same folder, then rename).
    A personalised concept is written in the concept format (`concept.save_concept`; dtype and
    include_backbone do not apply to it)."""
    from safetensors.torch import save_file

    if weights.concept_tokens is not None:
        from .concept import save_concept
        return save_concept(weights, path)

    cast = DTYPES[dtype]
    cfg = DomainConfig.from_json(asdict(weights.config))
    cfg.backbone_included = include_backbone
    enc = weights.encoder.state_dict()
    if not include_backbone and not cfg.backbone_sha256:
        cfg.backbone_sha256 = tensors_sha256(backbone_state(enc))
    tensors = {f"encoder.{k}": v for k, v in enc.items() if include_backbone or not k.startswith("clip_vision.")}
    tensors.update({f"offsets.{k}": v for k, v in to_published(weights.offsets).items()})
    tensors.update({f"unet_delta.{k}": v for k, v in weights.unet_delta.items()})
    tensors = {k: v.detach().to("cpu", cast if v.is_floating_point() else v.dtype).contiguous() for k, v in tensors.items()}
    if weights.concept_tokens is not None:
        tensors["concept.tokens"] = weights.concept_tokens.detach().to("cpu", cast).contiguous()
    if weights.concept_image is not None:
        tensors["concept.image"] = weights.concept_image.detach().to("cpu", torch.uint8).contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata_json(cfg, FORMAT_VERSION)))


def metadata_json(cfg: DomainConfig, version: int) -> dict:
    """The safetensors metadata of our files: the config as JSON under `e4t`."""
    return {"e4t": json.dumps({"format_version": version, "architecture": ARCHITECTURE, **asdict(cfg)})}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write):
    """write(tmp) into a temporary file beside `path`, flushed to disk, then renamed over `path`:
    readers see the old file or the whole new one, never half a file. The file gets the permissions
    of any newly created file (0666 less the umask), not the temporary file's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(prefix=".e4t-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


STALE_SECONDS = 24 * 3600      # no write of ours takes a day: an older temporary was left by a killed process


def remove_stale_temporaries(folder: str) -> None:
    """Delete `.e4t-*.tmp` files a killed write left in `folder` (only those untouched for a day, so a
    write still running in another process keeps its file)."""
    import glob
    import time
    for tmp in glob.glob(os.path.join(glob.escape(folder), ".e4t-*.tmp")):
        try:
            if time.time() - os.path.getmtime(tmp) > STALE_SECONDS:
                os.unlink(tmp)
        except OSError:             # removed meanwhile, or not ours to remove
            pass


def walk(root: str):
    """os.walk following links, each real folder once (a link back up the tree would loop forever)."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        yield dirpath, dirnames, filenames


def read_header(path: str) -> dict:
    """The `e4t` metadata of one of our files, without reading tensors."""
    meta = safetensors_metadata(path, OURS_FIX)
    if "e4t" not in meta:
        raise E4TFileError(f"{path}: not an E4T file (no 'e4t' metadata); convert published folders with "
                           f"`python -m e4t convert`")
    try:
        data = json.loads(meta["e4t"])
    except ValueError as err:
        raise E4TFileError(f"{path}: damaged E4T metadata ({err}); {OURS_FIX}") from None
    if data.get("format_version", 0) > CONCEPT_FORMAT_VERSION or data.get("architecture") != ARCHITECTURE:
        raise E4TFileError(f"{path}: format {data.get('architecture')} v{data.get('format_version')} is not "
                           f"supported by this version ({ARCHITECTURE} v{CONCEPT_FORMAT_VERSION}); update the extension")
    return data


def load_file(path: str, backbone: dict | None = None, find_source=None) -> E4TWeights:
    """Read our `.safetensors` (memory-mapped). `backbone`: a stock ViT state dict, used only for a
    file that carries none, and only if its tensor hash equals the one recorded at conversion.
    find_source(name) -> path: where the E4T weights a concept names are (see `concept.load_concept`)."""
    data = read_header(path)
    sd = read_safetensors(path, OURS_FIX)
    if data.get("format_version", 1) >= CONCEPT_FORMAT_VERSION:
        from .concept import load_concept
        return load_concept(path, data, sd, find_source)
    cfg = DomainConfig.from_json(data)
    groups = {}
    for key, value in sd.items():
        group, _, name = key.partition(".")
        groups.setdefault(group, {})[name] = value
    enc_sd = groups.get("encoder", {})
    concept = groups.get("concept", {})
    if not cfg.backbone_included and backbone is not None:
        stock = backbone_state(backbone)
        if tensors_sha256(stock) != cfg.backbone_sha256:
            raise E4TFileError(f"{path}: the given CLIP-vision weights are not the backbone this file was "
                               f"converted against ({cfg.backbone_id}); use that exact file")
        enc_sd.update({f"clip_vision.{k}": v for k, v in stock.items()})
    elif not cfg.backbone_included and "tokens" not in concept:
        raise E4TFileError(f"{path} carries no ViT backbone: give the stock {cfg.backbone_id} CLIP-vision "
                           f"file it was converted against")
    encoder = build_encoder(EncoderConfig(**cfg.encoder), enc_sd)
    offsets = from_published(groups.get("offsets", {})).requires_grad_(False).eval()
    if concept:
        from .concept import upgrade_metadata
        cfg.concept = upgrade_metadata(cfg.concept)
    return E4TWeights(config=cfg, encoder=encoder, offsets=offsets, unet_delta=groups.get("unet_delta", {}),
                      concept_tokens=concept.get("tokens"), concept_image=concept.get("image"))


def load(path: str, backbone: dict | None = None, find_source=None) -> E4TWeights:
    """Either a published folder (or a file inside one) or one of our `.safetensors` files."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith((".pt", ".bin", ".json")):
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        weights, fix = load_published(folder), PUBLISHED_FIX
    else:
        weights, fix = load_file(path, backbone, find_source), OURS_FIX
    validate.weights_finite(path, weights, fix)
    return weights


def convert(folder: str, out: str, stock_backbone: str | None = None, dtype: str = "fp16"):
    """Published folder -> one `.safetensors`. The backbone is kept unless `stock_backbone` is proven
    tensor-for-tensor identical to it; a differing stock file is refused, naming the first difference."""
    weights = load_published(folder)
    validate.weights_finite(folder, weights, PUBLISHED_FIX, backbone=True)
    include = True
    if stock_backbone is not None:
        stock = backbone_state(read_tensors(stock_backbone))
        ours = backbone_state(weights.encoder.state_dict())
        diff = first_difference(ours, stock)
        if diff is not None:
            raise E4TFileError(f"{stock_backbone} differs from the backbone in {folder}/encoder.pt at tensor "
                               f"{diff!r}: the E4T backbone was fine-tuned, keep it (omit --stock-backbone)")
        weights.config.backbone_sha256 = tensors_sha256(stock)
        include = False
    save(weights, out, dtype=dtype, include_backbone=include)
    return weights

