"""Our one-file format for E4T weights, `load` for either format, and `convert` from the published folder.

One `.safetensors` file; tensors `encoder.<published key>`, `offsets.<published key>`; JSON metadata
under the key `e4t` (`DomainConfig` with `format_version` and `architecture`). Written atomically, fp16
by default. A personalised concept is format 2 (`concept.py`); format-1 files holding a concept
(`unet_delta.<CompVis key>`, `concept.tokens`, `concept.image`) still load.
"""
import json
import os
from dataclasses import asdict

import torch

from . import validate
from .atomic import atomic_write
from .backbone import backbone_state, first_difference
from .encoder import EncoderConfig
from .files import E4TFileError, read_safetensors, read_tensors, safetensors_metadata
from .hashing import tensors_sha256
from .offsets import from_published, to_published
from .published import PUBLISHED_FIX, load_published
from .weights import DomainConfig, E4TWeights, build_encoder

FORMAT_VERSION = 1                 # E4T weights; personalised concepts are format 2 (concept.py)
CONCEPT_FORMAT_VERSION = 2
ARCHITECTURE = "e4t-v1"            # published layout: ViT tokens + U-Net maps heads, rank-3 q/k/v offsets
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
OURS_FIX = "copy it again, or make it again (`python -m e4t convert` for E4T weights, a new tune for a concept)"


def save(weights: E4TWeights, path: str, dtype: str = "fp16", include_backbone: bool = True):
    """Write one `.safetensors` file atomically. A personalised concept is written in the concept format
    (`concept.save_concept`; dtype and include_backbone do not apply to it)."""
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
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata_json(cfg, FORMAT_VERSION)))


def metadata_json(cfg: DomainConfig, version: int) -> dict:
    """The safetensors metadata of our files: the config as JSON under `e4t`."""
    return {"e4t": json.dumps({"format_version": version, "architecture": ARCHITECTURE, **asdict(cfg)})}


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
