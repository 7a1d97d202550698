"""`python -m e4t pretrain`: builds the models (ComfyUI's loader, or --tiny ones) and runs e4t.pretrain."""
import os
from dataclasses import asdict

import torch

import e4t
from e4t import (PretrainConfig, augment, backbone_state, ddim, image_files, load_image, pretrain,
                 read_tensors)

from .comfy_models import SD1, import_comfy, tiny_encoder


def _distributed(device_arg):
    """torchrun sets WORLD_SIZE/LOCAL_RANK: one process per GPU (gloo on the CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available() and device_arg != "cpu"
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def _encoder(args, sd1):
    if args.init:
        weights = e4t.load(args.init)
        return weights.encoder, weights.offsets.float(), weights.config
    if args.tiny:
        encoder = tiny_encoder(sd1)
    else:
        if not args.vit:
            raise e4t.E4TFileError("give --vit (the ViT-H/14 CLIP-vision weights, open_clip or Hugging Face "
                                   "layout) or --init (E4T weights to start from)")
        encoder = e4t.Encoder(e4t.EncoderConfig())
        encoder.clip_vision.load_state_dict(backbone_state(read_tensors(args.vit)))
    offsets = e4t.Offsets(e4t.targets(sd1.unet.state_dict()), identity=not args.published_init)
    return encoder, offsets, e4t.DomainConfig(domain_word=args.domain_word, reg_lambda=args.reg_lambda,
                                              encoder=asdict(encoder.cfg))


def run(args):
    device = _distributed(args.device)
    import_comfy(args.comfyui, cpu=device.type == "cpu")
    files = image_files(args.data)
    torch.manual_seed(args.seed)
    sd1 = SD1.tiny(device) if args.tiny else SD1.from_checkpoint(args.ckpt, device)
    encoder, offsets, domain = _encoder(args, sd1)
    encoder.clip_vision.to(device).requires_grad_(False)
    encoder.to(device)
    offsets.to(device)
    domain.domain_word = args.domain_word
    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch, base_lr=args.base_lr, scale_lr=not args.no_scale_lr,
                         reg_lambda=args.reg_lambda, resolution=64 if args.tiny else args.resolution,
                         prediction=sd1.prediction, checkpointing=args.checkpointing, save_every=args.save_every,
                         sample_every=args.sample_every, seed=args.seed)
    text_encode = sd1.text_encode_for(domain.placeholder)
    empty = sd1.empty_context()
    e_domain = sd1.e_domain(args.domain_word)
    concept = augment(load_image(files[0]), None, cfg.resolution, torch.Generator().manual_seed(0))[0]

    def sample(weights, step):
        """A sample of the first image's concept, DDIM with per-step refinement, to samples/."""
        with torch.no_grad():
            head = weights.encoder.fold(weights.encoder.image_features(concept[None].to(device)))
            deltas = {k: d.detach() for k, d in weights.offsets.deltas().items()}
            with e4t.applied(sd1.unet, deltas):
                refine = lambda x, t: e4t.predict_embedding(head, sd1.unet, x, t, empty, e_domain, domain.scale)
                z = ddim(sd1.unet, refine, text_encode, f"a photo of {domain.placeholder}", empty,
                                      sd1.alphas_cumprod, (1, 4, cfg.resolution // 8, cfg.resolution // 8),
                                      steps=args.sample_steps, generator=torch.Generator().manual_seed(0),
                                      prediction=sd1.prediction)
            image = sd1.vae_decode(z)[0]
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        e4t.save_png(image, os.path.join(args.out, "samples", f"step-{step:06d}.png"))

    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision) if device.type == "cuda" else None
    weights = pretrain(sd1.unet, encoder, offsets, files, args.out, text_encode=text_encode, vae_encode=sd1.vae_encode,
                       e_domain=e_domain, empty_context=empty, alphas_cumprod=sd1.alphas_cumprod, domain=domain,
                       cfg=cfg, resume=args.resume, sample=sample, autocast_dtype=autocast)
    return weights
