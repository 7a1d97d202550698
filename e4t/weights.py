"""E4T weights in memory: the domain's settings (`DomainConfig`), the encoder and the weight offsets.

Both file formats (the published folder, `published.py`; our one-file `.safetensors`, `weights_file.py`)
read into and write from these. `DomainConfig` is also the JSON metadata of our files: its fields are a
format, kept loading in every later version.
"""
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .encoder import Encoder, EncoderConfig
from .offsets import Offsets, load_checked

STOCK_BACKBONE = "ViT-H-14/laion2b_s32b_b79k"


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
