"""A1111 sampling time with a concept that trains all U-Net weights ÷ without E4T, inside a real webui.

Runs under the webui's Python with the test harness's random-weight models (tests/a1111_harness.py; a
fresh --data folder builds them), headless on the CPU:

    HF_HOME=/work/hosts/hf-cache /work/hosts/venv-a1111/bin/python benchmarks/a1111_sampling.py \
        --webui /work/hosts/stable-diffusion-webui --data /tmp/a1111-bench [--channels 32] [--size 64] [--clip-l]

A step's time is the median interval between consecutive denoiser callbacks of one job (CPU time of the
process, and wall time), so loading, VAE and the first step are left out. Jobs: no E4T; E4T with a prompt
without the placeholder (weights only: each changed layer run once with W'); E4T with the placeholder (weights,
per-step w from the feature pass, whose maps stand in for the negative's down/mid blocks in the webui's call,
re-encoding through the slot encoder); the same with the negative's pass run whole (the setting
"e4t_share_negative_pass" off); and both E4T jobs with every layer keeping the host's output and adding
layer(x; W' − W), as before W' replaced the host's product.
"""
import argparse
import os
import statistics
import sys
import time
from contextlib import closing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import a1111_harness as H  # noqa: E402

STAMPS = []


def stamp(params):
    STAMPS.append((time.perf_counter(), time.process_time()))


def job(prompt, e4t_args, steps, size):
    from modules import processing
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=H.ENV.sd_model, prompt=prompt, negative_prompt="", sampler_name="Euler", steps=steps, cfg_scale=7.0,
        width=size, height=size, seed=1234, batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True,
        outpath_samples=os.path.join(H.ENV.data, "outputs"), outpath_grids=os.path.join(H.ENV.data, "outputs"))
    p.script_args = list(e4t_args)
    p.scripts = H.runner(e4t_args)
    STAMPS.clear()
    with closing(p):
        processing.process_images(p)
    wall = statistics.median(b[0] - a[0] for a, b in zip(STAMPS, STAMPS[1:]))
    cpu = statistics.median(b[1] - a[1] for a, b in zip(STAMPS, STAMPS[1:]))
    return wall, cpu


def clip_l_size():
    """The harness's random CLIP at CLIP-L's size (its tokenizer and everything else unchanged); the U-Net's
    context and the concept's word vector follow its width. Needs a fresh --data folder."""
    import dataclasses
    import transformers
    small, build, encoder_config = transformers.CLIPTextConfig, H.build_tiny_checkpoint, H.tiny_encoder_config

    def clip_config(**kw):
        return small(**{**kw, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "projection_dim": 768})

    def build_clip_l(*args, **kwargs):
        transformers.CLIPTextConfig = clip_config       # what H.build_tiny_checkpoint imports
        try:
            return build(*args, **kwargs)
        finally:
            transformers.CLIPTextConfig = small
    H.build_tiny_checkpoint = build_clip_l
    H.tiny_encoder_config = lambda unet: dataclasses.replace(encoder_config(unet), word_dim=768)
    H.TINY_YAML = H.TINY_YAML.replace("context_dim: 64", "context_dim: 768")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--webui", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--channels", type=int, default=32, help="U-Net model_channels of the random checkpoint")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clip-l", action="store_true", help="a text encoder of CLIP-L's size (12 layers, width 768) "
                    "instead of the tiny one, so the per-step text encoding weighs as in SD1.5")
    ap.add_argument("--no-before", dest="before", action="store_false",
                    help="leave out the jobs with W' - W added (the cost before each layer ran once with W')")
    args = ap.parse_args()
    if args.channels != 32:
        H.TINY_YAML = H.TINY_YAML.replace("model_channels: 32", f"model_channels: {args.channels}")
    if args.clip_l:
        clip_l_size()
    H.start_webui(os.path.abspath(args.webui), os.path.abspath(args.data), "normal")
    from modules import script_callbacks
    from e4t_a1111 import hooks
    script_callbacks.on_cfg_denoiser(stamp, name="e4t-bench-stamp")
    cases = [("no E4T", "a photo of *s", (False, None, 1.0, 0)),
             ("E4T, weights only", "a photo of a cat", H.concept_args()),
             ("E4T, refined (negative's down path from the feature pass)", "a photo of *s", H.concept_args())]
    rows = {}
    for _ in range(args.repeats):
        for name, prompt, e4t_args in cases:
            rows.setdefault(name, []).append(job(prompt, e4t_args, args.steps, args.size))
        on = H.e4t_setting("e4t_share_negative_pass", False)               # Settings > E4T, on by default
        try:
            rows.setdefault("E4T, refined, negative's pass whole (setting off)", []).append(
                job(*cases[2][1:], args.steps, args.size))
        finally:
            H.e4t_setting("e4t_share_negative_pass", on)
        plain, hooks._is_plain = hooks._is_plain, (lambda *a: False)      # every layer: host + layer(x; W' - W)
        try:
            for name, prompt, e4t_args in cases[1:] if args.before else ():
                rows.setdefault(f"{name}, W' - W added (before)", []).append(job(prompt, e4t_args, args.steps,
                                                                                  args.size))
        finally:
            hooks._is_plain = plain
    params = sum(p.numel() for p in H.ENV.unet.parameters())
    text = sum(p.numel() for p in H.ENV.sd_model.cond_stage_model.parameters())
    print(f"\nA1111 sampling, U-Net {params / 1e6:.2f} M params, text encoder {text / 1e6:.1f} M, {args.size} px, "
          f"Euler CFG 7, {args.steps} steps, trains-all concept; median step of the best of {args.repeats} jobs (CPU)\n")
    print("| job | wall ms/step | CPU ms/step | CPU ratio to no E4T | CPU ms/step of each job |\n|---|---|---|---|---|")
    base = min(c for _, c in rows["no E4T"])
    for name, found in rows.items():
        wall, cpu = min(w for w, _ in found), min(c for _, c in found)
        each = ", ".join(f"{c * 1e3:.0f}" for _, c in found)
        print(f"| {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {cpu / base:.2f}x | {each} |")


if __name__ == "__main__":
    main()
