"""E4T for Automatic1111 1.10: the E4T tab (tune a concept from one image) and the always-on E4T
script of txt2img/img2img (per-step refinement of the placeholder, the concept's weights on the U-Net's
layers for the job).

Thin entry: the engine is the host-free package `e4t`, the webui glue `e4t_a1111`, both at the
extension root (the webui puts that root on sys.path only while it loads this file).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)          # after the webui's own folders: ours (scripts, tests, ...) must not shadow them

from modules import script_callbacks, scripts  # noqa: E402

import e4t  # noqa: E402,F401
from e4t_a1111 import sampling, ui  # noqa: E402


class E4TScript(scripts.Script):
    def title(self):
        return "E4T"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return ui.script_ui(self, is_img2img)

    def before_process(self, p, *args):
        sampling.RUNTIME.before_process(p)   # a job inside an E4T job: the outer session steps aside

    def process(self, p, enabled=False, concept=None, strength=1.0, t_stop=0, plot=False, *args):
        if enabled:
            sampling.RUNTIME.start(p, concept, strength, t_stop)

    def process_before_every_sampling(self, p, *args, **kwargs):
        sampling.RUNTIME.begin_pass(p)

    def postprocess(self, p, processed, enabled=False, concept=None, strength=1.0, t_stop=0, plot=False, *args):
        try:
            if enabled and plot:
                ui.add_norm_plots(processed, sampling.RUNTIME.norm_runs(p))
        finally:
            sampling.RUNTIME.stop(p)


script_callbacks.on_cfg_denoiser(sampling.RUNTIME.on_cfg_denoiser, name="e4t")
script_callbacks.on_ui_tabs(ui.tab, name="e4t")
script_callbacks.on_ui_settings(ui.settings, name="e4t")
script_callbacks.on_infotext_pasted(ui.infotext_pasted, name="e4t")
script_callbacks.on_model_loaded(sampling.RUNTIME.model_loaded, name="e4t")
script_callbacks.on_script_unloaded(sampling.RUNTIME.stop_all, name="e4t")
