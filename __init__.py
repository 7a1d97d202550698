"""ComfyUI entry of the E4T pack (the engine itself is `e4t/`, host-free)."""
import logging

from .e4t.seeding import reproducible_cpu_math

if reproducible_cpu_math() is False:     # first, before MKL runs: same-seed CPU tunes repeat bit for bit
    logging.info("E4T: MKL's reproducible mode is off (MKL_CBWR set otherwise, or MKL ran before this pack loaded): "
                 "two CPU tunes with the same seed may differ in the last bits")

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
