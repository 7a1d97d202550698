"""Domain pre-training (paper §3.3): encoder heads and weight offsets learned on many images of one domain.

Host-free like `tune`: the caller supplies the U-Net, a differentiable text encoder, the VAE and the
noise schedule (the command line builds them with ComfyUI's loader, see `e4t_standalone`). The base
U-Net stays frozen (no gradients are computed for it). Offsets start at identity (ΔW = 0) unless the
published initialisation is asked for. Checkpoints are our `.safetensors` plus a resumable training
state (optimizer and random-number states), both written atomically; with several processes started
by `torchrun`, gradients are averaged across them with torch.distributed and rank 0 writes files.
"""
import csv
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from .atomic import atomic_write
from .files import E4TFileError, read_pickle
from .folders import walk
from .weights import DomainConfig, E4TWeights
from .weights_file import save
from .encoder import Encoder
from .images import pil_to_tensor
from .offsets import Offsets
from .optim import adamw
from .training import Objective, UNetWeights, training_mode
from .tune import TEMPLATES, augment, trainable_heads

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
LOG_EVERY = 10                           # steps per line of loss.csv and of the progress line


@dataclass(frozen=True)
class PretrainConfig:
    """What `python -m e4t pretrain` sets. The rest is the published recipe, fixed: its regulariser, AdamW with
    weight decay 0.01, no gradient clipping, the "normal" prompt templates."""
    steps: int = 30000                   # paper: face 30k, cat 60k, art 100k
    batch_size: int = 16                 # per process
    base_lr: float = 1e-6
    scale_lr: bool = True                # lr = base_lr x batch x processes (paper: 1e-6 x 16 = 1.6e-5)
    reg_lambda: float = 0.01             # paper §3.3
    resolution: int = 512
    prediction: str = "eps"              # the model's: "v" for v-prediction checkpoints
    checkpointing: bool = False
    save_every: int = 1000
    sample_every: int = 1000
    seed: int = 0

    @property
    def lr(self):
        world = dist.get_world_size() if dist.is_initialized() else 1
        return self.base_lr * (self.batch_size * world if self.scale_lr else 1)


def image_files(folder: str) -> list:
    """Every jpg/png/webp below `folder`, sorted; a clear error when there is none."""
    files = sorted(os.path.join(d, f) for d, _, names in walk(folder)
                   for f in names if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise E4TFileError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) found, searched recursively; "
                           f"point --data at a folder of images of the domain")
    return files


def load_image(path: str) -> torch.Tensor:
    """(3, h, w) in [-1, 1]."""
    from PIL import Image
    with Image.open(path) as im:
        return pil_to_tensor(im) * 2 - 1


class Progress:
    """One line per log step with the step rate and an ETA (stderr)."""

    def __init__(self, total, start):
        self.total, self.start, self.t0 = total, start, time.perf_counter()

    def __call__(self, step, loss):
        rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0
        print(f"\r[e4t pretrain] step {step}/{self.total} loss {loss:.4f} {rate:.2f} it/s "
              f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}", file=sys.stderr, end="",
              flush=True)


def pretrain(unet, encoder: Encoder, offsets: Offsets, files: list, out_dir: str, *, text_encode, vae_encode,
             e_domain, empty_context, alphas_cumprod, domain: DomainConfig, cfg: PretrainConfig = PretrainConfig(),
             resume: str | None = None, sample=None, autocast_dtype=None):
    """Train heads and offsets for cfg.steps; returns the final E4TWeights. `sample(weights, step)` may
    write sample images. `resume`: a `state.pt` this function wrote."""
    with training_mode(unet):
        return _pretrain(unet, encoder, offsets, files, out_dir, text_encode, vae_encode, e_domain, empty_context,
                         alphas_cumprod, domain, cfg, resume, sample, autocast_dtype)


def _pretrain(unet, encoder, offsets, files, out_dir, text_encode, vae_encode, e_domain, empty_context,
              alphas_cumprod, domain, cfg, resume, sample, autocast_dtype):
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = next(unet.parameters()).device
    os.makedirs(out_dir, exist_ok=True)
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    rng = random.Random(cfg.seed + rank)
    enc = trainable_heads(encoder, device)
    offs = offsets.to(device).float().requires_grad_(True).train()
    params = enc.heads() + list(offs.parameters())
    opt = adamw(params, device, lr=cfg.lr, weight_decay=0.01)
    acp = alphas_cumprod.to(device, torch.float32)
    objective = Objective(unet, enc, offs, UNetWeights(unet, set(), compute=None if autocast_dtype else torch.float32), text_encode,
                          e_domain.detach().to(device, torch.float32).clone(), empty_context.detach().to(device).clone(),
                          acp, domain.scale, cfg.prediction, cfg.reg_lambda, cfg.checkpointing,
                          autocast_dtype)
    start = 0
    if resume:
        state = read_pickle(resume, "resume from an earlier state.pt, or start again without --resume", state_dict=False)
        enc.load_state_dict(state["heads"], strict=False)
        offs.load_state_dict(state["offsets"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"][rank])
        rng.setstate(_to_tuple(state["random"][rank]))
        torch.set_rng_state(state["torch"][rank])
        start = int(state["step"])
    log = os.path.join(out_dir, "loss.csv")
    if rank == 0 and resume and os.path.exists(log):   # drop rows logged after the checkpoint resumed from
        with open(log, newline="") as f:
            rows = [r for r in csv.reader(f)]
        with open(log, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) <= start])
    progress = Progress(cfg.steps, start)

    def weights():
        return E4TWeights(config=domain, encoder=enc, offsets=offs)

    for step in range(start + 1, cfg.steps + 1):
        opt.zero_grad(set_to_none=True)
        pick = torch.randint(0, len(files), (cfg.batch_size,), generator=generator).tolist()
        crops = torch.stack([augment(load_image(files[i]), None, cfg.resolution, generator)[0] for i in pick]).to(device)
        with torch.no_grad():
            latents = vae_encode(crops).float()
            tokens = enc.image_features(crops).tokens.detach()
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, len(acp), (cfg.batch_size,), generator=generator).to(device)
        prompts = [rng.choice(TEMPLATES["normal"]).format(domain.placeholder) for _ in range(cfg.batch_size)]
        loss = objective.backward(tokens, latents, noise, t, prompts)
        if dist.is_initialized():
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        opt.step()
        save_now = step % cfg.save_every == 0 or step == cfg.steps
        states = _random_states(generator, rng) if save_now else None       # collective: every rank
        if rank:
            continue
        if step % LOG_EVERY == 0 or step == cfg.steps:
            progress(step, loss)
            new = not os.path.exists(log)
            with open(log, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", "loss"])
                writer.writerow([step, f"{loss:.6f}"])
        if save_now:
            _checkpoint(out_dir, step, weights(), enc, offs, opt, states)
        if sample is not None and (step % cfg.sample_every == 0 or step == cfg.steps):
            sample(weights(), step)
    if rank == 0:
        print(file=sys.stderr)
    enc.requires_grad_(False).eval()
    offs.requires_grad_(False).eval()
    return weights()


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _random_states(generator, rng):
    """Every rank's random states (generator, Python, torch), so a resumed run continues exactly."""
    mine = (generator.get_state(), rng.getstate(), torch.get_rng_state())
    if not dist.is_initialized():
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def _checkpoint(out_dir, step, weights, enc, offs, opt, states):
    """`e4t-<step>.safetensors` (fp32, loadable by both hosts) and `state.pt` to resume from, atomically."""
    save(weights, os.path.join(out_dir, f"e4t-{step:06d}.safetensors"), dtype="fp32")
    heads = {k: v for k, v in enc.state_dict().items() if not k.startswith("clip_vision.")}
    state = {"step": step, "heads": heads, "offsets": offs.state_dict(), "optimizer": opt.state_dict(),
             "generator": [g for g, _, _ in states], "random": [r for _, r, _ in states],
             "torch": [t for _, _, t in states], "config": asdict(weights.config)}
    atomic_write(os.path.join(out_dir, "state.pt"), lambda tmp: torch.save(state, tmp))
