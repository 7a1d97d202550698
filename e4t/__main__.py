"""Command line: `python -m e4t convert|eval ...` (see --help of each)."""
import argparse
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
    ev.add_argument("--face-model", help="TorchScript face-recognition model (112x112 input) for identity")
    ev.add_argument("--out", default="e4t_eval.csv")
    ev.add_argument("--plot", default="e4t_eval.png")
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
    except (E4TFileError, KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
