"""E4T Face Mask: a MASK for the face-masked tune, found automatically in the concept image."""
from ..e4t import CASCADES, detect_mask, validate


class E4TFaceMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "detect": (list(CASCADES), {"tooltip": "what to look for (OpenCV Haar cascade shipped in its wheel)"}),
            "grow": ("FLOAT", {"default": 1.6, "min": 1.0, "max": 4.0, "step": 0.1,
                               "tooltip": "mask size relative to the detected box (keeps hair and chin)"}),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "mask"
    CATEGORY = "E4T"
    DESCRIPTION = ("Finds the face (or cat face) in the concept image and returns an elliptical MASK for E4T "
                   "Personalize. Needs opencv-python-headless<5; otherwise paint the mask by hand.")

    def mask(self, image, detect, grow):
        grow = validate.number("grow", grow, 1, 4)
        return (detect_mask(validate.image(image), detect, grow)[None],)
