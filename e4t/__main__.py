"""Command line: `python -m e4t convert <published_dir> <out.safetensors>`."""
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
    args = parser.parse_args(argv)
    try:
        weights = convert(args.published_dir, args.out, args.stock_backbone, args.dtype)
    except (E4TFileError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: domain '{weights.config.domain_word}', {len(weights.offsets.targets)} offsets, "
          f"backbone {'included' if args.stock_backbone is None else 'from ' + args.stock_backbone}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
