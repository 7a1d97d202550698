"""Peak GPU memory of the tune in each memory mode, estimated on the CPU (`e4t.memory`), at full size.

    python benchmarks/memory.py                                  # fast / low_vram x all / attention
    python benchmarks/memory.py --tunes low_vram:all --config checkpointing=True,accumulation=16
    python benchmarks/memory.py --tiny                           # tiny models, seconds
    python benchmarks/memory.py --ops                            # and operations / kernels per step, full size

Models are those of benchmarks/bench.py (ComfyUI's own classes: SD1.5 U-Net and CLIP-L text in fp16 as
ComfyUI loads them on a GPU, SDPA attention as on the H100 runs), built on fake tensors: no weights in
memory. On the device when the tune starts, as in bench.py's Setup: U-Net, text encoder and the copies
its text callable runs on, cached image features; the E4T weights stay on the CPU. Prints a markdown
table with the H100 peaks measured by bench.py beside the estimates.
"""
import argparse
import ast
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), "tests"))
import conftest  # noqa: E402,F401  (imports the engine as `e4t` without shadowing ComfyUI's `nodes`)
import e4t  # noqa: E402
import tiny_models as tm  # noqa: E402
from e4t import memory  # noqa: E402
from e4t_standalone import comfy_models  # noqa: E402
from dispatch_count import per_step  # noqa: E402

# torch.cuda.max_memory_allocated of bench.py's 2-step tune, batch 16, 512 px, bf16 autocast, H100
# (BENCHMARKS.md, 2026-11-23). The low_vram figures of that day (22.89 / 15.09 GiB) were of the previous low_vram
# mode (fp32 masters, 4 micro-batches, bf16 moments); the estimate matched them at commit 5a186c2 (22.73 / 15.00).
MEASURED_H100 = {("fast", "all"): 44.57}


def fake_models(tiny, dtype=torch.float16):
    """The host's U-Net and text transformer as bench.py builds them, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    comfy_models.import_comfy(cpu=True)
    from comfy.ldm.modules import attention
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch  # as on a GPU
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = comfy_models.tiny_model(unet_config=tm.TINY_UNET if tiny else tm.SD15_UNET, dtype=dtype)
        clip = tm.tiny_clip(clip_config=tm.TINY_CLIP if tiny else tm.CLIP_L)
    return model.model.diffusion_model, tm.text_model(clip)


def value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models (checks the script; numbers mean nothing)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=None, help="default 512 (64 with --tiny)")
    p.add_argument("--tunes", default="fast:all,low_vram:all,low_vram:attention",
                   help="comma-separated memory:trains pairs (memory: fast, low_vram; trains: all, attention)")
    p.add_argument("--config", action="append", default=[],
                   help="extra TuneConfig fields for every row, e.g. checkpointing=True,accumulation=16 "
                        "(repeat the option for more rows: each adds its own set)")
    p.add_argument("--autocast", choices=["bf16", "fp16", "none"], default="bf16")
    p.add_argument("--weights", choices=["fp16", "fp32"], default="fp16",
                   help="the host's U-Net and text weights (fp32: ComfyUI on a CPU)")
    p.add_argument("--ops", action="store_true",
                   help="also count the operations a step dispatches, and those not views (about one GPU kernel "
                        "each): the same tune run for 1 and 2 steps, the difference")
    args = p.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    res = args.resolution or (64 if args.tiny else 512)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.autocast]
    t0 = time.perf_counter()
    weights = {"fp16": torch.float16, "fp32": torch.float32}[args.weights]
    unet, text = fake_models(args.tiny, weights)
    built = time.perf_counter() - t0
    extras = [dict((kv.split("=", 1)[0], value(kv.split("=", 1)[1])) for kv in c.split(",")) for c in args.config] or [{}]
    print(f"# E4T tune memory, estimated on the CPU ({'tiny' if args.tiny else 'full-size'} SD1.5 U-Net + CLIP-L, "
          f"batch {args.batch}, {res} px, autocast {args.autocast}), torch {torch.__version__}")
    print(f"ComfyUI {comfy_models.comfy_root()}; fake models built in {built:.1f} s")
    print(f"command: python benchmarks/memory.py {' '.join(sys.argv[1:])}\n")
    heads = [memory.DESCRIPTIONS[k] for k in memory.CATEGORIES]
    ops_heads = " ops per step | kernels per step |" if args.ops else ""
    print("| mode | trains | extra | estimate | H100 measured | error | " + " | ".join(heads) + " | CPU time |" + ops_heads)
    print("|---|---|---|---|---|---|" + "---|" * len(heads) + "---|" + "---|---|" * args.ops)
    for pair in args.tunes.split(","):
        mode, trains = pair.split(":")
        for extra in extras:
            cfg = e4t.TuneConfig(batch_size=args.batch, resolution=res, lr=1e-5,
                                 trains=trains, **{**e4t.memory_settings(mode), **extra})
            found = {}

            def estimate(steps=2):
                found[steps] = memory.estimate_tune_peak(
                    unet, cfg, text_model=text, autocast_dtype=autocast, weight_dtype=weights, steps=steps,
                    clone_norm_inputs=comfy_models.in_place_residuals(),
                    encoder_config=tm.tiny_encoder_config() if args.tiny else None)
            if args.ops:
                step_counts = per_step(estimate)                 # runs the 2-step estimate too
            else:
                estimate()
            est = found[2]
            gib = est.peak / 2**30
            measured = None if args.tiny or extra or args.batch != 16 or res != 512 or args.autocast != "bf16" \
                else MEASURED_H100.get((mode, trains))
            cells = [mode, trains, ", ".join(f"{k}={v}" for k, v in extra.items()) or "-", f"**{gib:.2f} GiB**",
                     "-" if measured is None else f"{measured:.2f} GiB",
                     "-" if measured is None else f"{(gib - measured) / measured * 100:+.1f} %"]
            cells += [f"{est.breakdown[k] / 2**30:.2f}" for k in memory.CATEGORIES] + [f"{est.seconds:.0f} s"]
            if args.ops:
                cells += [str(n) for n in step_counts]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
