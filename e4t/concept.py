"""Personalised concepts: one file format, one metadata schema, one writer and one reader for both hosts.

A concept stores only what a tune changed: the deltas of the encoder heads and weight offsets against the
E4T weights it was tuned from (the *source*, named by file and by a hash of its heads and offsets) and the
U-Net delta against the base model (named by its fingerprint), plus the concept image's ViT tokens and
pixels. Deltas of matrices are kept as truncated SVDs: AdamW's first steps are sign-like, and a 15-step
tune's delta is a sum of near-sign steps of gradients of rank <= batch x tokens, whose spectrum is
concentrated enough that a few directions carry the U-Net's and the encoder's response to it (measured in
benchmarks/concept.py, BENCHMARKS.md). Vectors and small tensors are kept whole in fp32.

File (format_version 2): tensors `delta.<group>.<name>` (whole) or `lowrank.<group>.<name>.{u,s,v}`
(u (m, r) and v (r, ...) fp16 with orthonormal rows/columns, s (r,) fp32) for the groups `encoder`
(head parameter names), `offsets` (published keys) and `unet` (CompVis names); `concept.tokens`,
`concept.image`; the metadata of `weights.DomainConfig` with `concept` as built by `concept_metadata`.
A concept with no recorded source (upgraded from a format-1 file) keeps heads and offsets whole.
"""
import hashlib
import os
from dataclasses import asdict, dataclass

import torch

from .atomic import atomic_write
from .backbone import backbone_state
from .files import E4TFileError
from .hashing import tensors_sha256
from .weights import DomainConfig, E4TWeights, build_encoder
from .weights_file import CONCEPT_FORMAT_VERSION, metadata_json
from .encoder import EncoderConfig
from .offsets import from_published, to_published

SCHEMA = 2                         # of the `concept` metadata; format-1 files are upgraded on reading
GROUPS = ("encoder", "offsets", "unet")


@dataclass(frozen=True)
class Compression:
    """How a concept's deltas are stored. `rank`: singular directions kept per matrix of heads and offsets,
    `unet_rank` per matrix of the U-Net delta (fewer when those already hold `energy` of the delta's squared norm);
    tensors under `whole_below` elements are kept whole. The U-Net gets more: at rank 8 a full-size trains-all tune
    was off by 4.4 % (median) in the noise prediction, at 32 by 0.19 % (BENCHMARKS.md)."""
    rank: int = 8
    unet_rank: int = 32
    energy: float = 0.9999
    whole_below: int = 1 << 16

    @classmethod
    def from_json(cls, data: dict):
        return cls(**{k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__})


# --- the metadata schema ----------------------------------------------------------------------------

def concept_metadata(*, host: str, source: str, source_sha256: str, image_sha256: str, base_fingerprint: str,
                     tune, losses, base_model: str = "", mask: str | None = None,
                     compression: Compression = Compression()) -> dict:
    """`DomainConfig.concept` of a tuned concept, the same keys whichever host tuned it.

    source: the host's name of the E4T weights, recorded without `.safetensors` or a folder's trailing `/`
    (hosts resolve it below their E4T folder); mask: None (whole image), "uploaded", "node" or an automatic
    kind ("face", "cat")."""
    source = source_name(source)
    settings = asdict(tune)
    return {"schema": SCHEMA, "host": host, "source": source, "source_sha256": source_sha256,
            "base_model": base_model, "base_fingerprint": base_fingerprint, "image_sha256": image_sha256,
            "mask": mask, "tune": settings, "losses": [round(float(x), 6) for x in losses],
            "compression": asdict(compression)}


def source_name(name: str) -> str:
    """A host's name of E4T weights as a concept records it: `faces/e4t-face`, whichever host named it."""
    name = name.replace("\\", "/").rstrip("/")
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


_TUNE_KEYS = ("steps", "batch_size", "lr", "reg_lambda", "regularizer", "trains", "augmentation", "n_augmentations",
              "resolution", "templates", "prediction", "grad_clip", "weight_decay", "accumulation", "checkpointing",
              "optimizer_states", "seed")


def upgrade_metadata(concept: dict) -> dict:
    """A format-1 concept's metadata in the current schema. ComfyUI wrote the tune settings flat, A1111
    nested them under `tune` with `masked`, `mask`, `host`, `base_model`; neither recorded a source hash."""
    if concept.get("schema", 1) >= SCHEMA:
        return concept
    tune = dict(concept.get("tune") or {k: concept[k] for k in _TUNE_KEYS if k in concept})
    mask = concept.get("mask") if concept.get("masked", concept.get("mask") is not None) else None
    return {"schema": SCHEMA, "host": concept.get("host", "comfyui"), "source": concept.get("source", ""),
            "source_sha256": "", "base_model": concept.get("base_model", ""),
            "base_fingerprint": concept.get("base_fingerprint", ""), "image_sha256": concept.get("image_sha256", ""),
            "mask": mask, "tune": tune, "losses": list(concept.get("losses", [])), "compression": None}


def source_sha256(weights: E4TWeights) -> str:
    """Hash of the heads and offsets of E4T weights (what a concept's deltas are relative to), at fp16;
    computed once per object."""
    if not weights.heads_sha256:
        weights.heads_sha256 = tensors_sha256(_heads_and_offsets(weights))
    return weights.heads_sha256


def _heads_and_offsets(weights: E4TWeights) -> dict:
    heads = {f"encoder.{k}": v for k, v in weights.encoder.state_dict().items() if not k.startswith("clip_vision.")}
    return {**heads, **{f"offsets.{k}": v for k, v in to_published(weights.offsets).items()}}


# --- compression ------------------------------------------------------------------------------------

def compress(deltas: dict, group: str, compression: Compression) -> dict:
    """{name: delta} -> file tensors of one group (see the module docstring). Deterministic."""
    out = {}
    for name, delta in deltas.items():
        d = delta.detach().float()                   # on its device (a GPU factorises faster), stored from the CPU
        m = d.reshape(d.shape[0], -1) if d.dim() > 1 else d
        rank = compression.unet_rank if group == "unet" else compression.rank
        if d.dim() < 2 or d.numel() < compression.whole_below or min(m.shape) <= 2 * rank:
            out[f"delta.{group}.{name}"] = d.cpu().contiguous()
            continue
        u, s, v = _truncated_svd(m, rank, compression.energy)
        out[f"lowrank.{group}.{name}.u"] = u.to("cpu", torch.float16).contiguous()
        out[f"lowrank.{group}.{name}.s"] = s.cpu().contiguous()
        out[f"lowrank.{group}.{name}.v"] = v.T.reshape(len(s), *d.shape[1:]).to("cpu", torch.float16).contiguous()
    return out


def _truncated_svd(m: torch.Tensor, rank: int, energy: float):
    total = float(m.square().sum())
    if total == 0:
        return m.new_zeros(m.shape[0], 0), m.new_zeros(0), m.new_zeros(m.shape[1], 0)
    with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(m, q=min(rank + 8, *m.shape), niter=4)
    kept = (s[:rank].square().cumsum(0) / total)
    r = min(rank, int((kept < energy).sum()) + 1)
    return u[:, :r], s[:r], v[:, :r]


def decompress(tensors: dict, group: str, dtype=torch.float32, base: dict | None = None) -> dict:
    """File tensors -> {name: delta} of one group, or {name: base + delta} for the names in `base` (fp32, the
    sum formed in place: a load allocates each dense tensor once)."""
    out = {}
    whole, low = f"delta.{group}.", f"lowrank.{group}."
    base = base or {}
    for key, t in tensors.items():
        if key.startswith(whole):
            name = key[len(whole):]
            out[name] = _copy(base[name]).add_(t) if name in base else t.to(dtype)
        elif key.startswith(low) and key.endswith(".u"):
            name = key[len(low):-2]
            s, v = tensors[f"{low}{name}.s"], tensors[f"{low}{name}.v"]
            us, vm = t.float() * s, v.float().reshape(len(s), -1)
            if name in base:
                out[name] = _copy(base[name])
                out[name].view(t.shape[0], -1).addmm_(us, vm)
            else:
                out[name] = (us @ vm).reshape(t.shape[0], *v.shape[1:]).to(dtype)
    return out


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous fp32 tensor of t's values (never t itself)."""
    return t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


# --- building, saving and loading -------------------------------------------------------------------

def make_concept(source: E4TWeights, result, *, tokens: torch.Tensor, image: torch.Tensor, metadata: dict,
                 domain_word: str | None = None) -> E4TWeights:
    """A tune's result as the concept both hosts apply and save: the deltas go through the file's compression
    here, so the concept a host applies right after the tune is exactly the one a reload gives.

    source: the E4T weights tuned from; result: `TuneResult`; tokens: the concept image's ViT tokens;
    image: its (h, w, 3) uint8 pixels; metadata: from `concept_metadata`."""
    comp = Compression.from_json(metadata["compression"])
    config = DomainConfig.from_json(asdict(source.config))
    config.concept = metadata
    if domain_word:
        config.domain_word = domain_word
    if not config.backbone_sha256 and not source.encoder.clip_vision.conv1.weight.is_meta:
        config.backbone_sha256 = source.config.backbone_sha256 = tensors_sha256(backbone_state(   # once per source
            source.encoder.state_dict()))
    ref = _heads_and_offsets(source)
    tuned = {f"encoder.{k}": v for k, v in result.encoder.state_dict().items() if not k.startswith("clip_vision.")}
    tuned.update({f"offsets.{k}": v for k, v in to_published(result.offsets).items()})
    packed = {}
    for group in ("encoder", "offsets"):
        deltas = {k[len(group) + 1:]: v.detach().cpu().float() - ref[k].detach().cpu().float()
                  for k, v in tuned.items() if k.startswith(group + ".")}
        packed.update(compress(deltas, group, comp))
    packed.update(compress(result.unet_delta, "unet", comp))
    packed["concept.tokens"] = tokens.detach().to("cpu", torch.float16).contiguous()
    packed["concept.image"] = image.detach().to("cpu", torch.uint8).contiguous()
    return _unpack(config, packed, source)


def _unpack(config: DomainConfig, packed: dict, source: E4TWeights | None) -> E4TWeights:
    """The applicable concept: source heads and offsets plus their deltas (or whole ones), dense U-Net delta."""
    state = {}
    for group in ("encoder", "offsets"):
        ref = {} if source is None else {k[len(group) + 1:]: v.detach().cpu() for k, v in
                                         _heads_and_offsets(source).items() if k.startswith(group + ".")}
        tuned = decompress(packed, group, base=ref)
        state.update({f"{group}.{k}": tuned[k] if k in tuned else v.float() for k, v in ref.items()})
        state.update({f"{group}.{k}": v for k, v in tuned.items() if k not in ref})
    heads = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    encoder = build_encoder(EncoderConfig(**config.encoder), heads)
    if source is not None and not source.encoder.clip_vision.conv1.weight.is_meta:
        encoder.clip_vision = source.encoder.clip_vision            # shared, as a tune's result shares it
    offsets = from_published({k[len("offsets."):]: v for k, v in state.items() if k.startswith("offsets.")})
    return E4TWeights(config=config, encoder=encoder, offsets=offsets.requires_grad_(False).eval(),
                      unet_delta=decompress(packed, "unet", torch.float16), concept_tokens=packed["concept.tokens"],
                      concept_image=packed.get("concept.image"), packed=packed)


def save_concept(weights: E4TWeights, path: str):
    """Write a concept (format 2) atomically. A concept without its packed deltas (read from a format-1
    file) is packed first, heads and offsets whole."""
    from safetensors.torch import save_file

    packed = weights.packed
    if packed is None:
        comp = Compression()
        weights.config.concept = {**upgrade_metadata(weights.config.concept), "compression": asdict(comp)}
        whole = Compression(whole_below=1 << 62)
        packed = {**compress({k[len("encoder."):]: v for k, v in _heads_and_offsets(weights).items()
                              if k.startswith("encoder.")}, "encoder", whole),
                  **compress({k[len("offsets."):]: v for k, v in _heads_and_offsets(weights).items()
                              if k.startswith("offsets.")}, "offsets", whole),
                  **compress(weights.unet_delta, "unet", comp),
                  "concept.tokens": weights.concept_tokens.detach().to("cpu", torch.float16).contiguous()}
        if weights.concept_image is not None:
            packed["concept.image"] = weights.concept_image.detach().to("cpu", torch.uint8).contiguous()
    config = DomainConfig.from_json(asdict(weights.config))
    config.backbone_included = False
    atomic_write(path, lambda tmp: save_file(packed, tmp, metadata=metadata_json(config, CONCEPT_FORMAT_VERSION)))


def load_concept(path: str, data: dict, tensors: dict, find_source=None) -> E4TWeights:
    """Read a format-2 concept. find_source(name) -> path of the E4T weights named in the file, or None;
    those weights must hash to the recorded value (they are what the deltas are relative to)."""
    config = DomainConfig.from_json(data)
    meta = config.concept
    source = None
    if meta.get("source_sha256"):
        source = _find_source(path, meta, find_source)
    return _unpack(config, tensors, source)


_sources = {}                                     # (path, size, mtime) -> (sha256, E4TWeights)


def _find_source(path, meta, find_source):
    from .weights_file import load

    name, wanted = meta.get("source", ""), meta["source_sha256"]
    found = find_source(name) if find_source is not None and name else None
    if not found or not os.path.exists(found):
        raise E4TFileError(f"{path}: this concept stores changes to the E4T weights {name!r} (sha256 of heads "
                           f"and offsets {wanted[:12]}...), which were not found: put that file in the E4T folder")
    stat = os.stat(found if not os.path.isdir(found) else os.path.join(found, "encoder.pt"))
    key = (os.path.realpath(found), stat.st_size, stat.st_mtime_ns)
    if key not in _sources:
        weights = _read_heads(found) if found.endswith(".safetensors") else load(found)
        _sources.clear()
        _sources[key] = (source_sha256(weights), weights)
    digest, weights = _sources[key]
    if digest != wanted:
        raise E4TFileError(f"{path}: this concept was tuned from E4T weights {name!r} with heads and offsets of "
                           f"sha256 {wanted[:12]}..., but {found} has {digest[:12]}...: put the E4T weights the "
                           f"concept was tuned from in the E4T folder under that name")
    return weights


def _read_heads(path: str) -> E4TWeights:
    """Heads and offsets of one of our E4T weight files, without its ViT backbone (memory-mapped)."""
    from safetensors import safe_open

    from .weights_file import read_header

    config = DomainConfig.from_json(read_header(path))
    with safe_open(path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()
                 if k.startswith("offsets.") or (k.startswith("encoder.") and not k.startswith("encoder.clip_vision."))}
    if config.concept or not any(k.startswith("offsets.") for k in state):
        raise E4TFileError(f"{path}: not E4T weights (a concept cannot be the source of another)")
    encoder = build_encoder(EncoderConfig(**config.encoder),
                            {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    offsets = from_published({k[len("offsets."):]: v for k, v in state.items() if k.startswith("offsets.")})
    return E4TWeights(config=config, encoder=encoder, offsets=offsets.requires_grad_(False).eval())


def check_base(config: DomainConfig, fingerprint: str) -> str | None:
    """A warning naming the base model a concept's U-Net delta was tuned on, when `fingerprint` differs."""
    meta = upgrade_metadata(config.concept)
    wanted = meta.get("base_fingerprint")
    if not wanted or wanted == fingerprint:
        return None
    named = f" ({meta['base_model']})" if meta.get("base_model") else ""
    return (f"this concept was tuned on another base model{named}, fingerprint {wanted}; this one is {fingerprint}: "
            f"its U-Net changes may not fit; load that checkpoint")


def file_info(path: str) -> dict:
    """Sizes of a concept file's parts in bytes, by group (for benchmarks and the UI)."""
    from safetensors import safe_open

    sizes = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            kind, _, rest = key.partition(".")
            group = rest.partition(".")[0] if kind in ("delta", "lowrank") else kind
            n = 1
            for dim in t.get_shape():
                n *= dim
            sizes[group] = sizes.get(group, 0) + n * {"F16": 2, "BF16": 2, "F32": 4, "U8": 1}.get(t.get_dtype(), 4)
    return sizes



def base_fingerprint(first_conv: torch.Tensor, last_conv: torch.Tensor) -> str:
    """Identifies a base U-Net by its first and last convolution weights (`input_blocks.0.0`, `out.2`),
    which LoRAs leave alone: a concept applied to another base gets a warning."""
    h = hashlib.sha256()
    for w in (first_conv, last_conv):
        h.update(w.detach().to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()[:16]
