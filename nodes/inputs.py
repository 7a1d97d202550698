"""ComfyUI inputs translated for `e4t.validate`: the checks every E4T node runs before anything slow."""
import comfy.supported_models

from ..e4t import unet_feature_channels, validate
from .patches import PREFIX

MASK_FIX = "paint the concept in the image's mask editor (or use E4T Face Mask)"


def image(x, what: str = "IMAGE"):
    """A validated RGB IMAGE batch of one: (1, h, w, 3) in [0, 1]."""
    return validate.image(x, what)[None]


def mask(m, image):
    """The MASK at the (validated) image's size, (h, w); None stays None."""
    return validate.mask(m, tuple(image.shape[1:3]), MASK_FIX)


def check_model(model, clip, e4t=None) -> None:
    """MODEL and CLIP are SD1.x (the model's architecture named in the refusal); E4T weights fit them."""
    config = model.model.model_config
    family = type(config).__name__
    unet = model.model.diffusion_model
    validate.sd1_model("the MODEL", family, isinstance(config, comfy.supported_models.SD15),
                       getattr(unet, "in_channels", 4))
    csm = clip.cond_stage_model
    if getattr(csm, "clip", None) != "clip_l":
        raise validate.InputError(f"the CLIP is a {type(csm).__name__} text encoder, not SD1.x's CLIP-L: connect "
                                  f"the CLIP of the same SD1.x checkpoint as the MODEL")
    if e4t is None:
        return
    width = csm.clip_l.transformer.text_model.embeddings.token_embedding.weight.shape[1]
    channels = sum(unet_feature_channels(unet.model_channels, unet.channel_mult, unet.num_res_blocks[0]))
    shapes = {k[len(PREFIX):]: v.shape for k, v in model.model_state_dict().items() if k.startswith(PREFIX)}
    cfg = e4t.weights.encoder.cfg
    validate.e4t_fits(e4t.name, cfg.word_dim, cfg.unet_dim, validate.changed_shapes(e4t.weights),
                      f"this {family} MODEL", width, channels, shapes)


def tune_inputs(model, clip, e4t, image_in, mask_in, cfg):
    """Everything E4T Personalize is given, checked before any model is loaded: (image, mask)."""
    validate.tune_config(cfg)
    validate.placeholder(e4t.config.placeholder)
    check_model(model, clip, e4t)
    img = image(image_in)
    return img, mask(mask_in, img)
