"""E4T in Automatic1111 (stable-diffusion-webui 1.10): the webui side of the host-free `e4t` engine.

    hooks     offsets and tuned U-Net weights per layer, each run once with W' (pure torch)
    host      the webui's SD1 model: checks, text encoder parts, placeholder embedding, Lora state
    store     the E4T folder (--e4t-dir): weights, concepts, cached loading, hashes
    sampling  a concept applied to one job: hooks, per-step refinement in on_cfg_denoiser
    shared_pass  the negative prompt's U-Net pass giving the encoder its input (a setting)
    tuning    the E4T tab's one-image tune and the concept file it saves
    ui        gradio parts: the tab, the txt2img/img2img accordion, settings, infotext paste
"""
import os

import e4t

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.dirname(os.path.dirname(os.path.abspath(e4t.__file__))) != _ROOT:
    raise ImportError(f"the module 'e4t' was imported from {e4t.__file__}, not from this extension ({_ROOT}): "
                      f"another package of that name is installed; uninstall it")
