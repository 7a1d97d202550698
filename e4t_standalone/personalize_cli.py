"""`python -m e4t personalize`: one image + prompts -> a concept file and images, from the terminal.

The models come from ComfyUI's loader (or `--tiny` random ones), as for `pretrain`. The work is the
engine's, as in the hosts: `e4t.tune`, `e4t.make_concept` + `e4t.save` for the concept file, and
sampling with `e4t.Refinement` (the word re-predicted at every step) on the weights read back from that
file, so the images show exactly what a host loading the concept gets.
"""
import os
import sys
import time
from dataclasses import asdict

import torch

import e4t

from .comfy_models import SD1, comfy_training, import_comfy, tiny_encoder

DEFAULTS = {"steps": 15, "batch": 16, "resolution": 512, "sample_steps": 25}
TINY = {"steps": 4, "batch": 4, "resolution": 64, "sample_steps": 10}     # a smoke run: seconds on a CPU


def _say(text, end="\n"):
    print(text, end=end, file=sys.stderr, flush=True)


def _open(path: str, what: str):
    """An image file, read; a clear error for anything else."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{what} {path!r} is not a readable image ({err})") from None


def _mask(path: str, size) -> torch.Tensor:
    """(h, w) in [0, 1] at the image's size (white = the concept), by the hosts' rule (`e4t.validate.mask`)."""
    grey = e4t.pil_to_tensor(_open(path, "mask").convert("L"))[0]
    return e4t.validate.mask(grey, size, "paint the concept white in the mask image", what=f"mask {path!r}")


def _weights(args, sd1):
    if args.e4t:
        weights = e4t.load(args.e4t)
        if weights.encoder.clip_vision.conv1.weight.is_meta:
            raise e4t.E4TFileError(f"{args.e4t} carries no ViT backbone (converted with --stock-backbone): convert "
                                   f"the published folder again without --stock-backbone to tune from it")
        return weights
    encoder = tiny_encoder(sd1)
    offsets = e4t.Offsets(e4t.targets(sd1.unet.state_dict()))
    return e4t.E4TWeights(config=e4t.DomainConfig(domain_word="face", encoder=asdict(encoder.cfg)), encoder=encoder,
                          offsets=offsets)


class _TuneProgress:
    """One line per tuning step: loss, seconds per step and the time left."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, step, total, loss):
        spent = time.perf_counter() - self.t0
        _say(f"  tune step {step}/{total}  loss {loss:.4f}  {spent / step:.2f} s/step  "
             f"{spent / step * (total - step):.0f} s left")


def run(args):
    """Returns (concept path, image paths)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for key, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.prompt:
        args.prompt = ["a portrait of {}", "{} as an astronaut, photo"]
    pixels = e4t.pil_pixels(_open(args.image, "image"))       # inputs are read before any model is loaded
    mask = _mask(args.mask, pixels.shape[:2]) if args.mask else None
    os.makedirs(args.out, exist_ok=True)

    started = time.perf_counter()
    import_comfy(args.comfyui, cpu=device.type == "cpu")
    _say(f"loading models on {device} ({'tiny random SD1 models' if args.tiny else args.ckpt}) ...")
    sd1 = SD1.tiny(device) if args.tiny else SD1.from_checkpoint(args.ckpt, device)
    weights = _weights(args, sd1)
    config = weights.config
    prompts = [p.replace("{}", config.placeholder) for p in args.prompt]
    for p in prompts:
        if config.placeholder not in p:
            _say(f"warning: the prompt {p!r} lacks the placeholder {config.placeholder!r}: the concept's word is not "
                 f"in it (only its weight changes apply)")
    resolution = args.resolution
    mode = e4t.memory_mode(args.memory, device, None, args.trains, args.batch, args.resolution)
    cfg = e4t.TuneConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, reg_lambda=args.reg_lambda,
                         seed=args.seed, trains=args.trains, resolution=resolution, prediction=sd1.prediction,
                         **e4t.memory_settings(mode))
    image = pixels.permute(2, 0, 1).float() / 255 * 2 - 1
    _say(f"models ready in {time.perf_counter() - started:.1f} s; ViT features of {args.image} ...")
    encoder = weights.encoder
    encoder.clip_vision.to(device)
    with torch.no_grad():
        features = encoder.image_features(image[None].to(device))
    encoder.clip_vision.to("cpu")                              # the tune reads the features only
    e_domain = sd1.e_domain(config.domain_word)
    empty = sd1.empty_context()
    text_encode = sd1.text_encode_for(config.placeholder)

    _say(f"tuning {cfg.steps} steps, batch {cfg.batch_size}, {resolution} px, memory mode {mode} ...")
    with comfy_training():
        result = e4t.tune(sd1.unet, encoder, weights.offsets, image, text_encode=text_encode,
                          vae_encode=sd1.vae_encode, e_domain=e_domain, empty_context=empty,
                          alphas_cumprod=sd1.alphas_cumprod, scale=config.scale, placeholder=config.placeholder,
                          cfg=cfg, mask=mask, features=features, progress=_TuneProgress())
    source_path = args.e4t or os.path.join(args.out, "tiny-e4t.safetensors")
    if not args.e4t:                                           # the concept stores changes to these weights
        e4t.save(weights, source_path)
    metadata = e4t.concept_metadata(
        host="cli", source=os.path.basename(os.path.normpath(source_path)), source_sha256=e4t.source_sha256(weights),
        image_sha256=e4t.pixels_sha256(pixels), base_model="tiny" if args.tiny else os.path.basename(args.ckpt),
        base_fingerprint=e4t.base_fingerprint(sd1.unet.input_blocks[0][0].weight, sd1.unet.out[2].weight),
        tune=cfg, losses=result.losses, mask="uploaded" if mask is not None else None)
    concept = e4t.make_concept(weights, result, tokens=features.tokens, image=pixels, metadata=metadata)
    concept_path = os.path.join(args.out, "concept.safetensors")
    e4t.save(concept, concept_path)
    plot = e4t.line_plot(range(1, len(result.losses) + 1), result.losses, "E4T tuning loss", "step", "loss")
    e4t.save_png(plot, os.path.join(args.out, "loss.png"))
    _say(f"wrote {concept_path}")
    del result, concept

    images = _sample(args, sd1, e4t.load(concept_path, find_source=lambda name: source_path), prompts, resolution, empty, e_domain, text_encode)
    _say(f"done in {time.perf_counter() - started:.1f} s")
    return concept_path, images


def _sample(args, sd1, concept, prompts, resolution, empty, e_domain, text_encode):
    """DDIM with per-step refinement, the concept's weights applied as the hosts apply them."""
    device = empty.device
    folded = concept.encoder.fold(e4t.ImageFeatures(tokens=concept.concept_tokens.float())).to(device)
    refinement = e4t.Refinement(folded, e_domain, empty, concept.config.scale, float(args.t_stop))
    deltas = {k: d.float() for k, d in concept.offsets.float().deltas().items()}
    paths = []
    with torch.no_grad(), e4t.applied(sd1.unet, deltas, args.strength, added=concept.unet_delta):
        for i, prompt in enumerate(prompts):
            for j in range(args.images_per_prompt):
                n = len(paths) + 1
                step = [0]

                def refine(x, t):
                    step[0] += 1
                    if sys.stderr.isatty():
                        _say(f"\r  image {n}: step {step[0]}/{args.sample_steps}", end="")
                    return refinement(sd1.unet, x, t)

                z = e4t.ddim(sd1.unet, refine, text_encode, prompt, empty, sd1.alphas_cumprod,
                             (1, 4, resolution // 8, resolution // 8), steps=args.sample_steps,
                             guidance=args.guidance, prediction=sd1.prediction,
                             generator=torch.Generator().manual_seed(args.seed + 1000 * i + j))
                path = os.path.join(args.out, f"{n:02d}.png")
                e4t.save_png(sd1.vae_decode(z)[0], path, {"parameters": f"{prompt}\nSteps: {args.sample_steps}, "
                                                    f"CFG scale: {args.guidance}, Seed: {args.seed + 1000 * i + j}, "
                                                    f"Sampler: DDIM, E4T: {os.path.basename(args.out)}"})
                _say(f"\r  image {n}: {path}  ({prompt})" + " " * 10)
                paths.append(path)
    return paths
