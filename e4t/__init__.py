"""E4T (Gal et al., arXiv 2302.12228) for Stable Diffusion 1.x, host-free: pure torch, no ComfyUI or A1111.

Public API (hosts use only these names):
    load, save, convert, E4TWeights, DomainConfig, E4TFileError  -- weight files
    Encoder, EncoderConfig, ImageFeatures, FoldedEncoder         -- the encoder (full; folded for sampling)
    Offsets, targets, merge, applied                              -- weight offsets W0 * (1 + ΔW)
    predict_embedding, Refinement, unet_features                  -- per-step refinement
    encode_with_word, WordInjector, domain_embedding              -- placeholder injection in CLIP text
    tune, TuneConfig, TuneResult, PRESETS, preset, Interrupted    -- one-image tuning
    sd1_alphas_cumprod, alphas_cumprod_of                         -- noise schedules (SD1.x; a host's)
"""
from .checkpoint import DomainConfig, E4TFileError, E4TWeights, convert, load, save
from .encoder import Encoder, EncoderConfig, FoldedEncoder, ImageFeatures
from .losses import alphas_cumprod_of, sd1_alphas_cumprod
from .offsets import Offsets, applied, merge, targets
from .refinement import Refinement, predict_embedding, unet_features
from .text import WordInjector, domain_embedding, encode_with_word
from .tune import PRESETS, Interrupted, TuneConfig, TuneResult, preset, tune

__all__ = ["load", "save", "convert", "E4TWeights", "DomainConfig", "E4TFileError", "Encoder", "EncoderConfig",
           "ImageFeatures", "FoldedEncoder", "Offsets", "targets", "merge", "applied", "predict_embedding", "Refinement",
           "unet_features", "WordInjector", "encode_with_word", "domain_embedding", "tune", "TuneConfig", "TuneResult", "PRESETS",
           "preset", "Interrupted", "sd1_alphas_cumprod", "alphas_cumprod_of"]
