"""Inputs checked where they enter, before anything slow: one rule per input, for both hosts.

Hosts translate their own types (ComfyUI IMAGE/MASK tensors, A1111 PIL images and form numbers) and
call these; every refusal says what is wrong and what to do. Non-finite values found later (during a
tune or sampling) raise `NonFiniteError`.
"""
import math
import numbers

import torch

MIN_SIDE = 16                      # pixels: anything smaller is not a picture of a concept
EMPTY_MASK = 0.01                  # a mask covering less than 1 % of the image is empty
TOLERANCE = 1e-3                   # rounding outside [0, 1] that is clamped, not refused


class InputError(ValueError):
    """An input the user can fix; the message says what is wrong and what to do."""


class NonFiniteError(InputError):
    """NaN or infinity where a finite number is needed."""


def _range(t: torch.Tensor) -> str:
    return f"{float(t.min()):.4g} to {float(t.max()):.4g}"


def _first(x, batched_dims: int, what: str, kind: str, empty: str) -> torch.Tensor:
    """The first item of a batch (a tensor of `batched_dims` dimensions), or `x` itself when it is not a batch."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"the {what} is a {type(x).__name__}, not {kind}")
    if x.dim() == batched_dims:
        if x.shape[0] == 0:
            raise InputError(f"the {what} batch is empty: {empty}")
        x = x[0]
    return x


def _in_unit_range(x: torch.Tensor, what: str, kind: str, eight_bit: str):
    if float(x.min()) < -TOLERANCE or float(x.max()) > 1 + TOLERANCE:
        raise InputError(f"the {what} holds values from {_range(x)}; {kind} holds 0 to 1 (values up to 255 are "
                         f"{eight_bit}: divide by 255)")


def image(x, what: str = "IMAGE") -> torch.Tensor:
    """A channels-last image or batch, (b, h, w, c) or (h, w, c), values in [0, 1] -> the first image as
    (h, w, 3) float. Greyscale is repeated to RGB; an alpha channel (grey + alpha, RGBA) is dropped, as
    when an RGBA picture is opened as RGB; anything else is refused."""
    x = _first(x, 4, what, "an image", "the node before it produced no image; check its inputs")
    if x.dim() == 2:
        raise InputError(f"the {what} has shape {list(x.shape)}, which is a mask (h, w), not an image; connect "
                         f"an image, or convert the mask to an image first")
    if x.dim() != 3:
        raise InputError(f"the {what} has shape {list(x.shape)}; an image is (batch, height, width, channels)")
    h, w, c = x.shape
    if c not in (1, 2, 3, 4):
        hint = " (channels first? an image here is channels last)" if h in (1, 3, 4) else ""
        raise InputError(f"the {what} has {c} channels{hint}; an image has 1 (grey), 3 (RGB) or 4 (RGBA)")
    if min(h, w) < MIN_SIDE:
        raise InputError(f"the {what} is {w}x{h} pixels; give an image of at least {MIN_SIDE} pixels per side "
                         f"(512 or more is best)")
    x = x.float()
    finite(what, x, "the node or file that made it produced them; check it")
    _in_unit_range(x, what, "an image", "8-bit pixels")
    rgb = x[..., :1].expand(h, w, 3) if c in (1, 2) else x[..., :3]
    return rgb.clamp(0, 1)


def mask(m, size: tuple, fix: str, what: str = "MASK") -> torch.Tensor | None:
    """A mask (h, w) or (b, h, w) in [0, 1], white = the concept -> (h, w) float at the image's `size`
    (h, w); None stays None. Empty means covering less than 1 % of the image (`EMPTY_MASK`), the one
    rule of both hosts; `fix` says how to make a mask in the host."""
    if m is None:
        return None
    m = _first(m, 3, what, "a mask", f"the node before it produced no mask; {fix}, or remove it")
    if m.dim() != 2:
        raise InputError(f"the {what} has shape {list(m.shape)}; a mask is (height, width)")
    if min(m.shape) < 1:
        raise InputError(f"the {what} has no pixels ({list(m.shape)}); {fix}, or remove it")
    m = m.float()
    finite(what, m, f"{fix}, or remove it")
    _in_unit_range(m, what, "a mask", "8-bit")
    (h, w), (mh, mw) = size, m.shape
    if abs(mh / mw - h / w) > 0.02 * h / w:
        raise InputError(f"the {what} is {mw}x{mh} pixels but the image is {w}x{h}: a mask must have the image's "
                         f"shape; use the mask made for this image")
    if (mh, mw) != (h, w):
        m = torch.nn.functional.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    m = m.clamp(0, 1)
    if float(m.mean()) < EMPTY_MASK:
        raise InputError(f"the {what} covers {100 * float(m.mean()):.2f} % of the image (less than "
                         f"{100 * EMPTY_MASK:.0f} %), so nothing would be learned from the image; {fix}, or remove it")
    return m


def number(name: str, value, low=None, high=None, integer: bool = False, fix: str = "") -> float | int:
    """A finite number within [low, high] (integer if asked); the refusal names the input and its range."""
    rule = "a whole number" if integer else "a number"
    if low is not None and high is not None:
        rule += f" from {low:g} to {high:g}"
    elif low is not None:
        rule += f" of at least {low:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} is {value!r}; give {rule}{fix}")
    if not math.isfinite(value):
        raise NonFiniteError(f"{name} is {value}; give {rule}{fix}")
    if integer and value != int(value):
        raise InputError(f"{name} is {value}; give {rule}{fix}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name} is {value:g}; give {rule}{fix}")
    return int(value) if integer else float(value)


def tune_config(cfg) -> None:
    """Every number of a TuneConfig: finite and in range, before any model is loaded."""
    number("steps", cfg.steps, 1, integer=True)
    number("batch size", cfg.batch_size, 1, integer=True)
    number("learning rate", cfg.lr, 0, 1, fix=" (published: 1.6e-5)")
    number("λ (reg_lambda)", cfg.reg_lambda, 0, fix=" (published: 1e-4; paper, faces: 0.1)")
    number("resolution", cfg.resolution, 64, integer=True)
    if cfg.resolution % 64:
        raise InputError(f"resolution is {cfg.resolution}; give a multiple of 64 (512 is the model's own)")
    number("micro-batches per step", cfg.accumulation, 1, integer=True)
    if cfg.batch_size % cfg.accumulation:
        raise InputError(f"batch size {cfg.batch_size} is not a multiple of the micro-batches per step "
                         f"({cfg.accumulation}); change one of them")
    number("seed", cfg.seed, 0, 2**64 - 1, integer=True)
    number("weight decay", cfg.weight_decay, 0)


def placeholder(word) -> str:
    """The placeholder word: text that is not empty or blank."""
    if not isinstance(word, str) or not word.strip():
        raise InputError(f"the placeholder is {word!r}: write the word that stands for the concept in the prompt "
                         f"(the concept's own, usually *s)")
    return word.strip()


def finite(what: str, tensors, fix: str) -> None:
    """Every value of a tensor, or of a {name: tensor} dict, is finite; the refusal names the first bad tensor."""
    items = tensors.items() if isinstance(tensors, dict) else [("", tensors)]
    for name, t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            where = f" (tensor {name!r})" if name else ""
            raise NonFiniteError(f"the {what}{where} holds NaN or infinite values; {fix}")


def sd1_model(name: str, family: str, is_sd1: bool, in_channels: int) -> None:
    """The base model is a standard SD1.x text-to-image model (E4T's encoder, offsets and word width are SD1's)."""
    if not is_sd1:
        raise InputError(f"{name} is a {family} model; E4T works with Stable Diffusion 1.x models only (SD 1.4, "
                         f"1.5 and models fine-tuned from them): load one of those")
    if in_channels != 4:
        raise InputError(f"{name} takes {in_channels} latent channels (an inpainting or instruct model); E4T needs "
                         f"a standard SD1.x model with 4: load one of those")


def changed_shapes(weights) -> dict:
    """{CompVis U-Net weight name: shape} of every weight E4T weights change (offsets, tuned U-Net change)."""
    offsets = weights.offsets
    shapes = {k: (offsets[k].linear_row.in_features, offsets[k].linear_column.in_features) for k in offsets.targets}
    shapes.update({k: tuple(v.shape) for k, v in weights.unet_delta.items()})
    return shapes


def e4t_fits(e4t_name: str, word_dim: int, unet_dim: int, changed: dict, model_name: str, text_width: int,
             feature_channels: int, unet_shapes: dict) -> None:
    """E4T weights (word width, U-Net feature channels, `changed`: see `changed_shapes`) fit the model (its
    text width, feature channels and `unet_shapes`: CompVis U-Net weight name -> shape)."""
    made = "use E4T weights made for this model family (SD1.x: word width 768, 3 520 U-Net feature channels)"
    if word_dim != text_width:
        raise InputError(f"{e4t_name} predicts words of width {word_dim}; {model_name}'s text encoder has width "
                         f"{text_width}: {made}")
    if unet_dim != feature_channels:
        raise InputError(f"{e4t_name} reads {unet_dim} U-Net feature channels; {model_name} has "
                         f"{feature_channels}: {made}")
    for k, shape in sorted(changed.items()):
        if k not in unet_shapes:
            raise InputError(f"{e4t_name} changes the U-Net weight {k!r}, which {model_name} does not have: {made}")
        if tuple(unet_shapes[k]) != tuple(shape):
            raise InputError(f"{e4t_name} changes {k!r} as {list(shape)}; in {model_name} it is "
                             f"{list(unet_shapes[k])}: {made}")


def weights_finite(name: str, weights, fix: str, backbone: bool = False) -> None:
    """Encoder heads, offsets and a concept's image tokens are finite (the ViT backbone too with `backbone`,
    which costs a pass over 2.5 GB; the tuned U-Net change is checked by its effect, see `Refinement`)."""
    enc = {k: v for k, v in weights.encoder.state_dict().items() if backbone or not k.startswith("clip_vision.")}
    finite(f"E4T file {name}", enc, fix)
    finite(f"E4T file {name}", {f"offsets.{k}": v for k, v in weights.offsets.state_dict().items()}, fix)
    if weights.concept_tokens is not None:
        finite(f"E4T file {name}", {"concept.tokens": weights.concept_tokens}, fix)
