"""E4T Text Encode: a prompt whose placeholder word is refined at every sampling step."""
import logging

from .prompt import LEGACY, PlaceholderPrompt


class E4TTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "a photo of *s"}),
            "placeholder": ("STRING", {"default": "*s", "tooltip": "the word that stands for the concept"}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "E4T"
    DESCRIPTION = "Encodes a prompt for E4T: the placeholder's embedding is predicted at every step by Apply E4T."

    def encode(self, clip, text, placeholder):
        prompt = PlaceholderPrompt(clip, text, placeholder)
        cond, pooled = clip.encode_from_tokens(prompt.tokens, return_pooled=True)
        extra = {"pooled_output": pooled}
        warnings = []
        if prompt.slots:
            # the prompt is re-encoded at every step with this CLIP: the sampler loads it with the U-Net
            extra.update({"e4t": prompt, "additional_models": [clip.patcher]})
            LEGACY.add(cond, prompt)
        else:
            warnings.append(f"the prompt has no placeholder '{placeholder}': E4T will not change it")
            logging.warning("E4T Text Encode: %s", warnings[0])
        return {"ui": {"e4t_warning": warnings}, "result": ([[cond, extra]],)}
