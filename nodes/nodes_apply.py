"""Apply E4T: weight offsets on a MODEL clone plus per-step refinement of E4T prompts."""
from ..e4t import validate
from . import inputs
from .refine import apply_e4t


class E4TApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "e4t": ("E4T",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                       "tooltip": "scales the weight offsets and the tuned U-Net change"}),
                "t_stop": ("INT", {"default": 0, "min": 0, "max": 1000,
                                   "tooltip": "below this timestep the embedding stops changing (0: refine to the end)"}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "the concept image; optional for a saved concept"}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "only for E4T files made without their ViT backbone"}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "E4T"
    DESCRIPTION = ("Patches E4T's weight offsets into a copy of the model (after any LoRA already on it) and "
                   "refines the placeholder of E4T Text Encode prompts at every step.")

    def apply(self, model, clip, e4t, strength, t_stop, image=None, clip_vision=None):
        strength = validate.number("strength", strength, 0, 2)
        t_stop = validate.number("t_stop", t_stop, 0, 1000, integer=True)
        image = None if image is None else inputs.image(image)
        return (apply_e4t(model, clip, e4t, image, strength, t_stop, clip_vision),)
