"""Moved: the names `concept.py` imports from here live in weights, weights_file, backbone, hashing and atomic.
Delete this file once `concept.py` imports them from those modules."""
from .atomic import atomic_write  # noqa: F401
from .backbone import backbone_state  # noqa: F401
from .files import E4TFileError  # noqa: F401
from .hashing import tensors_sha256  # noqa: F401
from .weights import DomainConfig, E4TWeights, build_encoder  # noqa: F401
from .weights_file import CONCEPT_FORMAT_VERSION, load, metadata_json, read_header  # noqa: F401
