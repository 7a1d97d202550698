"""Load E4T: our .safetensors files or a published mkshing/e4t-diffusion folder."""
from .. import e4t as engine
from . import folders
from .model import E4T


class E4TLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"e4t_name": (folders.choices(), {"tooltip": "file or published folder in models/e4t"})}}

    RETURN_TYPES = ("E4T",)
    FUNCTION = "load"
    CATEGORY = "E4T"
    DESCRIPTION = "Loads E4T weights (encoder + weight offsets) or a saved personalised concept."

    def load(self, e4t_name):
        return (E4T(engine.load(folders.full_path(e4t_name), find_source=folders.source_path), e4t_name),)
