"""Save / Load a personalised concept: one .safetensors file with everything needed to re-apply it."""
import os

import folder_paths

from .. import e4t as engine
from . import folders
from .nodes_load import E4TLoader

CONCEPTS = "concepts"


class E4TSaveConcept:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"e4t": ("E4T",), "filename_prefix": ("STRING", {"default": "concept"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "E4T"
    DESCRIPTION = ("Saves a tuned concept (encoder heads, offsets, U-Net changes, the concept image's features and "
                   "hashes of image and base model) to models/e4t/concepts, fp16, written atomically.")

    def save(self, e4t, filename_prefix):
        if e4t.weights.concept_tokens is None:
            raise ValueError("E4T Save Concept: this E4T is not a tuned concept; connect E4T Personalize's e4t output")
        root = os.path.join(folders.save_dir(), CONCEPTS)
        os.makedirs(root, exist_ok=True)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")   # the `_` core savers use: hosts count on it
        while os.path.exists(path):                                         # never replace a saved concept
            counter += 1
            path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        engine.save(e4t.weights, path, include_backbone=False)
        return {"ui": {"text": [os.path.relpath(path, folders.save_dir())]}}


class E4TLoadConcept:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"concept": ([c for c in folders.choices() if c.startswith(CONCEPTS + "/")],)}}

    RETURN_TYPES = ("E4T",)
    FUNCTION = "load"
    CATEGORY = "E4T"
    DESCRIPTION = "Loads a saved concept; Apply E4T then needs no image."

    def load(self, concept):
        return E4TLoader().load(concept)
