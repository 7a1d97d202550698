"""A1111 sampling time with a concept that trains all U-Net weights ÷ without E4T, inside a real webui.

Runs under the webui's Python with the test harness's random-weight models (tests/a1111_harness.py; a
fresh --data folder builds them), headless on the CPU:

    HF_HOME=/work/hosts/hf-cache /work/hosts/venv-a1111/bin/python benchmarks/a1111_sampling.py \
        --webui /work/hosts/stable-diffusion-webui --data /tmp/a1111-bench [--channels 32] [--size 64] [--clip-l]

A step's time is the median interval between consecutive denoiser callbacks of one job (CPU time of the
process), so loading, VAE and the first step are left out. Step times of one job drift by up to 40 % with the
state of glibc's heap over the process, so every round runs each job once, in a rotated order, and a job's ratio
is the median over the rounds of its step ÷ that round's step without E4T. Jobs: no E4T; E4T with a prompt
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
    def setting_off(fn):                 # Settings > E4T, on by default
        def run():
            on = H.e4t_setting("e4t_share_negative_pass", False)
            try:
                return fn()
            finally:
                H.e4t_setting("e4t_share_negative_pass", on)
        return run

    def added(fn):                       # every layer: host + layer(x; W' - W), as before W' replaced the product
        def run():
            plain, hooks._is_plain = hooks._is_plain, (lambda *a: False)
            try:
                return fn()
            finally:
                hooks._is_plain = plain
        return run

    def make(prompt, e4t_args):
        return lambda: job(prompt, e4t_args, args.steps, args.size)
    weights, refined = make("a photo of a cat", H.concept_args()), make("a photo of *s", H.concept_args())
    cases = {"no E4T": make("a photo of *s", (False, None, 1.0, 0)), "E4T, weights only": weights,
             "E4T, refined (negative's down path from the feature pass)": refined,
             "E4T, refined, negative's pass whole (setting off)": setting_off(refined)}
    if args.before:
        cases["E4T, weights only, W' - W added (before)"] = added(weights)
        cases["E4T, refined, W' - W added (before)"] = added(refined)
    names, rows = list(cases), {name: [] for name in cases}
    for r in range(args.repeats):        # each round in another order: the heap's state drifts over a process
        for name in names[r % len(names):] + names[:r % len(names)]:
            rows[name].append(cases[name]())
    params = sum(p.numel() for p in H.ENV.unet.parameters())
    text = sum(p.numel() for p in H.ENV.sd_model.cond_stage_model.parameters())
    print(f"\nA1111 sampling, U-Net {params / 1e6:.2f} M params, text encoder {text / 1e6:.1f} M, {args.size} px, "
          f"Euler CFG 7, {args.steps} steps, trains-all concept; {args.repeats} rounds, each job's median step "
          f"(CPU time); ratio: median over the rounds of the job's step ÷ the round's no-E4T step\n")
    print("| job | best CPU ms/step | median ratio to no E4T | ratio per round | CPU ms/step per round |\n"
          "|---|---|---|---|---|")
    base = [c for _, c in rows["no E4T"]]
    for name, found in rows.items():
        ratios = [c / b for (_, c), b in zip(found, base)]
        print(f"| {name} | {min(c for _, c in found) * 1e3:.1f} | {statistics.median(ratios):.2f}x | "
              f"{', '.join(f'{q:.2f}' for q in ratios)} | {', '.join(f'{c * 1e3:.0f}' for _, c in found)} |")

if __name__ == "__main__":
    main()
