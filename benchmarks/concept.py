"""Concept files: what a tune's delta looks like, how big its file is, how far the compressed concept is from
the exact tune where it matters (noise prediction, word embedding), and how fast it loads. Markdown tables.

    python benchmarks/concept.py --tiny                                  # tiny models, seconds
    flock /work/heavy.lock python benchmarks/concept.py --trains attention --res 128 --batch 1
                                                                         # full-size SD1.5 U-Net + ViT-H heads

Models: random weights built as benchmarks/bench.py builds them (ComfyUI's classes); the source E4T weights
are rounded to fp16 first, as hosts hold them after loading a file. The tune is the engine's `e4t.tune`;
the concept is made, saved and loaded by the engine functions both hosts call. Errors are relative:
to the exact tune's output (`rel`), and to what the tune changed relative to the untuned source (`of change`).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import Setup, timed  # noqa: E402
import e4t  # noqa: E402
from e4t.concept import Compression, file_info  # noqa: E402
from e4t.offsets import merge, to_published  # noqa: E402


def personalised(unet, weights):
    """The U-Net's parameters as a host applies a concept: (W0 + D) * (1 + ΔW); restored on exit."""
    class Swap:
        def __enter__(self):
            self.saved = {}
            deltas = weights.offsets.float().deltas() if weights is not None else {}
            for name, p in list(unet.named_parameters()):
                d = weights.unet_delta.get(name) if weights is not None else None
                if d is None and name not in deltas:
                    continue
                w = p.detach().float() + (d.float() if d is not None else 0)
                if name in deltas:
                    w = merge(w, deltas[name].detach())
                owner, _, attr = name.rpartition(".")
                sub = unet.get_submodule(owner)
                self.saved[(sub, attr)] = getattr(sub, attr)
                setattr(sub, attr, torch.nn.Parameter(w.to(p.dtype), requires_grad=False))

        def __exit__(self, *exc):
            for (sub, attr), p in self.saved.items():
                setattr(sub, attr, p)
    return Swap()


def outputs(s, weights, samples, prompts):
    """(w, eps) of a concept for every sample (x_t, t, prompt index)."""
    out = []
    folded = weights.encoder.fold(e4t.ImageFeatures(tokens=s.features.tokens.float()))
    with torch.no_grad(), personalised(s.unet, weights):
        for x, t, k in samples:
            w = e4t.predict_embedding(folded, s.unet, x, t, s.empty, s.e_domain, 0.1)
            ids, pos = prompts[k]
            eps = s.unet(x, timesteps=t, context=s.encode_ids(ids, w, pos))
            out.append((w.float(), eps.float()))
    return out


def errors(ours, exact, untuned):
    rel = lambda a, b: float((a - b).norm() / b.norm())
    rows = {}
    for i, what in ((1, "eps"), (0, "w")):
        r = [rel(o[i], e[i]) for o, e in zip(ours, exact)]
        c = [float((o[i] - e[i]).norm() / (e[i] - u[i]).norm()) for o, e, u in zip(ours, exact, untuned)]
        rows[what] = (statistics.median(r), max(r), statistics.median(c), max(c))
    return rows


def spectrum(deltas, ranks=(1, 4, 8, 16, 32, 64)):
    """Fraction of the squared norm in the top-r singular directions, pooled over a group's matrices."""
    total, kept = 0.0, [0.0] * len(ranks)
    for d in deltas.values():
        if d.dim() < 2 or min(d.shape[0], d[0].numel()) < 2 * max(ranks):
            continue
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1).float()).square()
        total += float(s.sum())
        for i, r in enumerate(ranks):
            kept[i] += float(s[:r].sum())
    return [k / total if total else float("nan") for k in kept]


def entropy(deltas, lr):
    """Bits per element of round(delta / lr): what an entropy coder would need for a ~lr-exact delta."""
    counts = {}
    n = 0
    for d in deltas.values():
        q = torch.round(d.float() / lr).to(torch.int64).flatten()
        values, c = torch.unique(q, return_counts=True)
        for v, k in zip(values.tolist(), c.tolist()):
            counts[v] = counts.get(v, 0) + k
        n += q.numel()
    p = torch.tensor(list(counts.values()), dtype=torch.float64) / n
    return float(-(p * p.log2()).sum()), n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--trains", default="attention", choices=["all", "attention"])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.6e-5)
    p.add_argument("--ranks", default="1,2,4,8,16", help="compressions to measure: rank per matrix")
    p.add_argument("--samples", type=int, default=4, help="noise draws per timestep and prompt")
    p.add_argument("--sizes", action="store_true", help="only the full-size file sizes per rank (meta tensors, seconds)")
    args = p.parse_args()
    if args.sizes:
        return sizes([int(r) for r in args.ranks.split(",")])
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    t_start = time.time()
    s = Setup(args.tiny, torch.device("cpu"), torch.float32)
    s.encoder.clip_vision.to("meta")                     # features are computed: the ViT is not needed any more
    with torch.no_grad():
        for t in s.encoder.heads() + list(s.offsets.parameters()):
            t.copy_(t.half().float())                    # as a host holds E4T weights read from an fp16 file
    source = e4t.E4TWeights(config=e4t.DomainConfig(encoder=dict(s.encoder.cfg.__dict__), backbone_sha256="bench"),
                            encoder=s.encoder, offsets=s.offsets)
    cfg = e4t.TuneConfig(steps=args.steps, batch_size=args.batch, resolution=args.res, lr=args.lr, trains=args.trains,
                         templates=("a photo of {}",), **e4t.memory_settings("low_vram"))
    t0 = time.time()
    result = e4t.tune(s.unet, s.encoder, s.offsets, s.image, text_encode=s.text_encode, vae_encode=s.vae_encode,
                      e_domain=s.e_domain, empty_context=s.empty, alphas_cumprod=e4t.sd1_alphas_cumprod(),
                      placeholder="sks", cfg=cfg, features=s.features, clone_norm_inputs=True)
    t_tune = time.time() - t0
    exact = e4t.E4TWeights(config=source.config, encoder=result.encoder, offsets=result.offsets,
                           unet_delta=result.unet_delta)

    # --- what the delta looks like -----------------------------------------------------------------
    ref = {f"encoder.{k}": v for k, v in s.encoder.state_dict().items() if not k.startswith("clip_vision.")}
    ref.update({f"offsets.{k}": v for k, v in to_published(s.offsets).items()})
    tuned = {f"encoder.{k}": v for k, v in result.encoder.state_dict().items() if not k.startswith("clip_vision.")}
    tuned.update({f"offsets.{k}": v for k, v in to_published(result.offsets).items()})
    groups = {g: {k: tuned[k].float() - ref[k].float() for k in ref if k.startswith(g + ".")}
              for g in ("encoder", "offsets")}
    groups["unet"] = result.unet_delta
    print(f"# concept benchmark: {'tiny' if args.tiny else 'full-size SD1.5 U-Net, ViT-H/14 heads'}, CPU "
          f"({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"command: python benchmarks/concept.py {' '.join(sys.argv[1:])}")
    print(f"tune: trains {args.trains}, {args.steps} steps, batch {args.batch}, {args.res} px, lr {args.lr}, "
          f"low_vram; {t_tune:.0f} s; losses {[round(x, 4) for x in result.losses]}\n")
    ranks = (1, 4, 8, 16, 32, 64)
    print("| delta | elements | share of squared norm in top-r directions, r = " + ", ".join(map(str, ranks))
          + " | bits/element of round(delta/lr) |\n|---|---|---|---|")
    for g, deltas in groups.items():
        bits, n = entropy(deltas, args.lr)
        print(f"| {g} | {n / 1e6:.1f} M | " + ", ".join(f"{x:.3f}" for x in spectrum(deltas, ranks))
              + f" | {bits:.2f} |")
    signs = torch.cat([d.flatten()[:100000] for d in groups["unet"].values()])
    print(f"\nU-Net delta / (steps * lr): median |.| {float((signs.abs() / (args.steps * args.lr)).median()):.3f}, "
          f"share within 1 % of ± steps*lr: {float(((signs.abs() / (args.steps * args.lr) - 1).abs() < 0.01).float().mean()):.3f}\n")

    # --- compressed concepts vs the exact one ------------------------------------------------------
    gen = torch.Generator().manual_seed(1)
    templates = ("a photo of sks", "a painting of sks in a forest", "sks wearing a hat, studio light")
    prompts = []
    for text in templates:
        ids = torch.tensor([[t for t, _ in s.clip.tokenize(text)["l"][0]]])
        prompts.append((ids, (ids[0] == 48136).nonzero()[0]))
    acp = e4t.sd1_alphas_cumprod()
    latent = s.vae_encode(s.image[None])
    samples = []
    for t in (50, 250, 500, 750, 950):
        for k in range(len(prompts)):
            for _ in range(args.samples):
                n = torch.randn(latent.shape, generator=gen)
                x = acp[t].sqrt() * latent + (1 - acp[t]).sqrt() * n
                samples.append((x, torch.tensor([float(t)]), k))
    untuned = outputs(s, source, samples, prompts)
    reference = outputs(s, exact, samples, prompts)
    print(f"{len(samples)} samples: timesteps 50..950 x {len(prompts)} prompts x {args.samples} noises, "
          f"{args.res // 8}x{args.res // 8} latents\n")
    print("| concept | file | heads / offsets / U-Net / image+tokens | eps rel median / worst | eps of change "
          "median / worst | w rel median / worst | w of change median / worst | load / read |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        src_path = os.path.join(tmp, "source.safetensors")
        e4t.save(source, src_path, include_backbone=False)
        find = lambda name: src_path
        whole = exact_file_size(groups, s)
        print(f"| format 1 (fp16, whole) | {whole / 2**20:.1f} MiB | | | | | | |")
        for rank in (int(r) for r in args.ranks.split(",")):
            comp = Compression(rank=rank)
            meta = e4t.concept_metadata(host="bench", source="source", source_sha256=e4t.source_sha256(source),
                                        image_sha256="", base_fingerprint="", tune=cfg, losses=result.losses,
                                        compression=comp)
            concept = e4t.make_concept(source, result, tokens=s.features.tokens, image=torch.zeros(512, 512, 3,
                                       dtype=torch.uint8), metadata=meta)
            path = os.path.join(tmp, f"r{rank}.safetensors")
            e4t.save(concept, path)
            size = os.path.getsize(path)
            parts_of = file_info(path)
            e4t.load(path, find_source=find)                       # the source's hash is computed once per file

            def read():
                with open(path, "rb") as f:
                    while f.read(1 << 24):
                        pass
            t_read = timed(read, torch.device("cpu"), 3)
            t_load = timed(lambda: e4t.load(path, find_source=find), torch.device("cpu"), 3)
            loaded = e4t.load(path, find_source=find)
            e = errors(outputs(s, loaded, samples, prompts), reference, untuned)
            parts = " / ".join(f"{parts_of.get(g, 0) / 2**20:.1f}" for g in ("encoder", "offsets", "unet")) + \
                f" / {parts_of.get('concept', 0) / 2**20:.1f} MiB"
            print(f"| rank {rank} | {size / 2**20:.1f} MiB | {parts} | {e['eps'][0]:.2%} / {e['eps'][1]:.2%} | "
                  f"{e['eps'][2]:.1%} / {e['eps'][3]:.1%} | {e['w'][0]:.2%} / {e['w'][1]:.2%} | "
                  f"{e['w'][2]:.1%} / {e['w'][3]:.1%} | {t_load * 1e3:.0f} ms / {t_read * 1e3:.0f} ms |")
            sys.stdout.flush()
    print(f"\ntotal {time.time() - t_start:.0f} s")


def sizes(ranks):
    """Full-size concept file sizes per rank, from the shapes alone (the format's arithmetic; no tune)."""
    import tiny_models as tm
    from e4t_standalone import comfy_models
    comfy_models.import_comfy(cpu=True)
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        unet = UNetModel(**tm.SD15_UNET, operations=comfy.ops.disable_weight_init, device="meta")
        enc = e4t.Encoder(e4t.EncoderConfig(), device="meta")
        offs = e4t.Offsets(e4t.targets(unet.state_dict()), device="meta")

    def size(shapes, comp):
        total = 0
        for shape in shapes:
            n = shape.numel()
            m, k = shape[0], n // shape[0]
            whole = len(shape) < 2 or n < comp.whole_below or min(m, k) <= 2 * comp.rank
            total += 4 * n if whole else comp.rank * (m + k) * 2 + 4 * comp.rank
        return total
    groups = {"heads": [p.shape for n, p in enc.named_parameters() if not n.startswith("clip_vision.")],
              "offsets": [v.shape for v in to_published(offs).values()],
              "U-Net attention": [p.shape for n, p in unet.named_parameters() if ".attn1." in n or ".attn2." in n],
              "U-Net all": [p.shape for p in unet.parameters()]}
    extra = 2 * 129 * 1280 + 512 * 512 * 3                  # tokens fp16, a 512 px image
    print("| rank (at most) | heads | offsets | U-Net attention | U-Net all | trains attention | trains all |")
    print("|---|---|---|---|---|---|---|")
    for r in ranks:
        b = {g: size(shapes, Compression(rank=r)) for g, shapes in groups.items()}
        mib = lambda x: f"{x / 2**20:.1f} MiB"
        print(f"| {r} | {mib(b['heads'])} | {mib(b['offsets'])} | {mib(b['U-Net attention'])} | {mib(b['U-Net all'])} "
              f"| {mib(b['heads'] + b['offsets'] + b['U-Net attention'] + extra)} "
              f"| {mib(b['heads'] + b['offsets'] + b['U-Net all'] + extra)} |")
    fp16 = sum(2 * s.numel() for g in ("heads", "offsets") for s in groups[g]) + extra
    print(f"| format 1 (fp16, whole) | | | | | {(fp16 + sum(2 * s.numel() for s in groups['U-Net attention'])) / 2**20:.0f} MiB "
          f"| {(fp16 + sum(2 * s.numel() for s in groups['U-Net all'])) / 2**20:.0f} MiB |")


def exact_file_size(groups, s):
    """Bytes of the format-1 concept: heads, offsets and U-Net delta whole in fp16, tokens, a 512 px image."""
    n = sum(d.numel() for g in groups.values() for d in g.values())
    return 2 * n + 2 * s.features.tokens.numel() + 512 * 512 * 3


if __name__ == "__main__":
    main()
