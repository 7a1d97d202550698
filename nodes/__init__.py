"""ComfyUI nodes of the E4T pack: thin declarations over the engine in `e4t/`."""
from . import folders
from .nodes_apply import E4TApply
from .nodes_concept import E4TLoadConcept, E4TSaveConcept
from .nodes_encode import E4TTextEncode
from .nodes_load import E4TLoader
from .nodes_mask import E4TFaceMask
from .nodes_plot import E4TEmbeddingPlot
from .nodes_tune import E4TPersonalize

folders.register()

# Node ids are public API (saved workflows use them): never rename without an alias.
NODE_CLASS_MAPPINGS = {
    "E4TLoader": E4TLoader,
    "E4TApply": E4TApply,
    "E4TTextEncode": E4TTextEncode,
    "E4TPersonalize": E4TPersonalize,
    "E4TSaveConcept": E4TSaveConcept,
    "E4TLoadConcept": E4TLoadConcept,
    "E4TEmbeddingPlot": E4TEmbeddingPlot,
    "E4TFaceMask": E4TFaceMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "E4TLoader": "Load E4T",
    "E4TApply": "Apply E4T",
    "E4TTextEncode": "E4T Text Encode",
    "E4TPersonalize": "E4T Personalize (tune)",
    "E4TSaveConcept": "E4T Save Concept",
    "E4TLoadConcept": "E4T Load Concept",
    "E4TEmbeddingPlot": "E4T Embedding Plot",
    "E4TFaceMask": "E4T Face Mask",
}
