"""Host code for the command line: SD1.x models built by ComfyUI's loader (see comfy_models)."""
