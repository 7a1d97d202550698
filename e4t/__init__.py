"""E4T (Gal et al., arXiv 2302.12228) for Stable Diffusion 1.x, host-free: pure torch, no ComfyUI or A1111.

Public API (hosts use only these names):
    load, save, convert, E4TWeights, DomainConfig, E4TFileError  -- weight files
    make_concept, concept_metadata, source_sha256, check_base,
    Compression                                                   -- personalised concepts (one schema, compressed)
    read_header, read_published_config, read_tensors, PickleRefused,
    backbone_state, tensors_sha256, walk, pixels_sha256          -- file details, safe reading, backbone proof, folders
    to_uint8, pil_pixels, pil_to_tensor, save_png                 -- [0, 1] -> uint8; PIL image -> uint8 pixels, (3, h, w); PNG
    Encoder, EncoderConfig, ImageFeatures, FoldedEncoder,
    unet_feature_channels                                        -- the encoder (full; folded for sampling)
    Offsets, targets, merge, applied                              -- weight offsets W0 * (1 + ΔW)
    OffsetGroups                                                  -- the offsets stacked by shape, as a tune trains them
    predict_embedding, Refinement, unet_features, KnownRows       -- per-step refinement (its pass shared with the negative's)
    encode_with_word, WordInjector, domain_embedding, MARKERS     -- placeholder injection in CLIP text
    clip_layers                                                   -- CLIP skip -> layers to run, for both hosts
    tune, TuneConfig, TuneResult, PRESETS, preset, Interrupted, Diverged,
    base_weights_notice                                           -- LoRAs active at a tune: left out (why: its docstring)
    augment, memory_settings, CompactAdamW                        -- one-image tuning (memory modes; compact AdamW)
    Precision, training_precision                                 -- the tune's precision policy per device
    pretrain, PretrainConfig, image_files, load_image, ddim       -- domain pre-training, sample images
    detect_mask, MaskUnavailable, CASCADES                        -- automatic face / cat masks (OpenCV)
    line_plot, scatter_plot                                       -- plots as images
    sd1_alphas_cumprod, alphas_cumprod_of                         -- noise schedules (SD1.x; a host's)
    validate, seeded                                              -- input checks of both hosts; a host step's global RNG from the seed
"""
from .backbone import backbone_state
from .files import E4TFileError
from .folders import walk
from .hashing import pixels_sha256, tensors_sha256
from .published import read_published_config
from .weights import DomainConfig, E4TWeights
from .weights_file import convert, load, read_header, save
from .concept import Compression, base_fingerprint, check_base, concept_metadata, make_concept, source_sha256
from .encoder import Encoder, EncoderConfig, FoldedEncoder, ImageFeatures, unet_feature_channels
from .images import pil_pixels, pil_to_tensor, save_png, to_uint8
from .files import PickleRefused, read_tensors
from .facemask import CASCADES, MaskUnavailable, detect_mask
from .losses import alphas_cumprod_of, sd1_alphas_cumprod
from .offsets import OffsetGroups, Offsets, applied, merge, targets
from .optim import CompactAdamW
from .plots import line_plot, scatter_plot
from .pretrain import PretrainConfig, image_files, load_image, pretrain
from .refinement import Refinement, predict_embedding, unet_features
from .known_rows import KnownRows
from .sampling import ddim
from .seeding import seeded
from . import validate
from .text import MARKERS, SlotEncoder, WordInjector, domain_embedding, encode_with_word, fast_dtype, input_embeddings
from .precision import Precision, training_precision
from .clip_skip import clip_layers
from .memory import available_memory, memory_mode, tune_peak
from .tune import MEMORY_MODES, PRESETS, Diverged, base_weights_notice, Interrupted, TuneConfig, TuneResult, augment, memory_settings, preset, tune

__all__ = ["load", "save", "convert", "E4TWeights", "DomainConfig", "E4TFileError", "make_concept", "concept_metadata",
           "source_sha256", "check_base", "Compression", "read_header",
           "read_published_config", "read_tensors", "PickleRefused", "walk", "pixels_sha256", "pil_pixels", "pil_to_tensor", "save_png", "to_uint8", "backbone_state", "tensors_sha256", "Encoder",
           "EncoderConfig", "ImageFeatures", "FoldedEncoder", "unet_feature_channels", "Offsets", "OffsetGroups", "targets", "merge",
           "applied", "predict_embedding", "Refinement", "unet_features", "KnownRows", "WordInjector", "encode_with_word", "SlotEncoder",
           "input_embeddings", "fast_dtype",
           "domain_embedding", "MARKERS", "tune", "TuneConfig", "TuneResult", "PRESETS", "preset", "Interrupted", "Diverged", "Precision", "training_precision", "augment", "memory_mode", "memory_settings", "tune_peak", "available_memory", "MEMORY_MODES", "base_fingerprint", "CompactAdamW",
           "pretrain", "PretrainConfig", "image_files", "load_image", "ddim", "detect_mask", "MaskUnavailable",
           "CASCADES", "line_plot", "scatter_plot", "sd1_alphas_cumprod", "alphas_cumprod_of", "seeded", "validate", "clip_layers", "base_weights_notice"]
