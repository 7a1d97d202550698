"""Concept files: what a tune's delta looks like, how big its file is, how far the compressed concept is from
the exact tune where it matters (noise prediction, word embedding), and how fast it loads. Markdown tables.

    python benchmarks/concept.py --tiny                                  # tiny models, seconds
    flock /work/heavy.lock python benchmarks/concept.py --trains attention --cache /tmp/budget-cache
                                  # full-size SD1.5 U-Net + ViT-H heads: about 12 GiB RAM, 3 tune steps at 128 px

Memory: the tune runs in the `low_vram` mode; the error pass writes each concept's personalised U-Net into the
model in place and reads the untouched weights back from a file, and the tune's result is freed once the concept
files are written. `--cache` keeps the tune's result for another run with other compressions.

Models: random weights built as benchmarks/bench.py builds them (ComfyUI's classes); the source E4T weights
are rounded to fp16 first, as hosts hold them after loading a file. The tune is the engine's `e4t.tune`;
the concept is made, saved and loaded by the engine functions both hosts call. Errors are relative:
to the exact tune's output (`rel`), and to what the tune changed relative to the untuned source (`of change`).
"""
import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import Setup, timed  # noqa: E402
import e4t  # noqa: E402
from e4t.concept import Compression, file_info  # noqa: E402
from e4t.offsets import merge, to_published  # noqa: E402


@contextmanager
def personalised(unet, weights, originals):
    """The U-Net's parameters as a host applies a concept, (W0 + D) * (1 + ΔW) in fp32, written in place (no
    second U-Net in memory); on exit every touched parameter is read back from `originals` (a safetensors
    file of the untouched U-Net)."""
    from safetensors import safe_open
    params = dict(unet.named_parameters())
    deltas = weights.offsets.float().deltas() if weights is not None else {}
    added = weights.unet_delta if weights is not None else {}
    names = sorted(set(deltas) | set(added))
    try:
        with torch.inference_mode():
            for name in names:
                p = params[name]
                w = p.float() + added[name].float() if name in added else p.float()
                p.copy_(merge(w, deltas[name].detach()) if name in deltas else w)
        del deltas
        yield
    finally:
        with torch.inference_mode(), safe_open(originals, framework="pt") as f:
            for name in names:
                params[name].copy_(f.get_tensor(name))


def outputs(s, weights, samples, prompts, originals):
    """(w, eps) of a concept for every sample (x_t, t, prompt index)."""
    out = []
    folded = weights.encoder.fold(e4t.ImageFeatures(tokens=s.features.tokens.float()))
    with torch.no_grad(), personalised(s.unet, weights, originals):
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


def matrices(deltas):
    return {k: d.reshape(d.shape[0], -1) for k, d in deltas.items() if d.dim() > 1 and min(d.shape[0], d[0].numel()) > 1}


def squared_singular_values(m):
    """Descending squared singular values of a matrix, from its Gram matrix in fp64 (fast for wide matrices)."""
    m = m.double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def spectrum(deltas, ranks, energies):
    """Pooled share of the squared norm in the top-r directions of each matrix, and per matrix the rank that
    holds a share e of its squared norm (median and largest over the group's matrices)."""
    total, kept, need = 0.0, [0.0] * len(ranks), {e: [] for e in energies}
    for m in matrices(deltas).values():
        s = squared_singular_values(m)
        total += float(s.sum())
        for i, r in enumerate(ranks):
            kept[i] += float(s[:r].sum())
        share = s.cumsum(0) / s.sum()
        for e in energies:
            need[e].append(int((share < e).sum()) + 1)
    return [k / total for k in kept], {e: (statistics.median(v), max(v)) for e, v in need.items()}


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


def compressions(args):
    """--ranks r1,r2 (rank of every part, the default energy) and --compression 'rank=64,energy=0.999' (any field)."""
    out = [Compression(rank=int(r), unet_rank=int(r)) for r in args.ranks.split(",") if r]
    for spec in args.compression:
        out.append(Compression(**{k: type(getattr(Compression(), k))(v) for k, v in
                                  (kv.split("=") for kv in spec.split(",") if kv)}))
    return out


def label(comp):
    default = Compression()
    diff = {k: v for k, v in asdict(comp).items() if v != getattr(default, k)}
    return "default" if not diff else ", ".join(f"{k} {v}" for k, v in diff.items())


def tuned(s, source, args, cfg, cache):
    """`e4t.tune`'s result, or the one saved in `cache` by an earlier run with the same settings and models."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from e4t.weights import build_encoder
    from e4t.offsets import from_published
    fingerprint = e4t.base_fingerprint(s.unet.input_blocks[0][0].weight, s.unet.out[2].weight) + \
        e4t.source_sha256(source)[:16]
    path = cache and os.path.join(cache, f"tune-{'tiny' if args.tiny else 'sd15'}-{args.trains}-{args.steps}x"
                                  f"{args.batch}-{args.res}px-lr{args.lr:g}.safetensors")
    if path and os.path.exists(path):
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["bench"])
            if meta["fingerprint"] == fingerprint:
                state = {k: f.get_tensor(k) for k in f.keys()}
                heads = {k[8:]: v for k, v in state.items() if k.startswith("encoder.")}
                result = e4t.TuneResult(
                    encoder=build_encoder(s.encoder.cfg, heads),
                    offsets=from_published({k[8:]: v for k, v in state.items() if k.startswith("offsets.")}),
                    unet_delta={k[5:]: v for k, v in state.items() if k.startswith("unet.")}, losses=meta["losses"])
                return result, meta["seconds"], True
    t0 = time.time()
    result = e4t.tune(s.unet, s.encoder, s.offsets, s.image, text_encode=s.text_encode, vae_encode=s.vae_encode,
                      e_domain=s.e_domain, empty_context=s.empty, alphas_cumprod=e4t.sd1_alphas_cumprod(),
                      placeholder="sks", cfg=cfg, features=s.features, clone_norm_inputs=True)
    seconds = time.time() - t0
    if path:
        os.makedirs(cache, exist_ok=True)
        state = {f"encoder.{k}": v for k, v in result.encoder.state_dict().items() if not k.startswith("clip_vision.")}
        state.update({f"offsets.{k}": v for k, v in to_published(result.offsets).items()})
        state.update({f"unet.{k}": v for k, v in result.unet_delta.items()})
        save_file({k: v.detach().contiguous() for k, v in state.items()}, path, metadata={"bench": json.dumps(
            {"fingerprint": fingerprint, "losses": result.losses, "seconds": seconds})})
    return result, seconds, False


def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--trains", default="attention", choices=["all", "attention"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.6e-5)
    p.add_argument("--ranks", default="1,4,8,16,32", help="compressions to measure: rank per matrix, default energy")
    p.add_argument("--compression", action="append", default=[], help="another compression, e.g. 'rank=64,energy=0.999'")
    p.add_argument("--samples", type=int, default=2, help="noise draws per timestep and prompt")
    p.add_argument("--floor", action="store_true", help="also the error of the exact deltas at format 1's fp16")
    p.add_argument("--cache", default="", help="folder keeping the tune's result for later runs (same settings)")
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
                         **e4t.memory_settings("low_vram"))
    result, t_tune, cached = tuned(s, source, args, cfg, args.cache)
    exact = e4t.E4TWeights(config=source.config, encoder=result.encoder, offsets=result.offsets,
                           unet_delta=result.unet_delta)
    print(f"# concept benchmark: {'tiny' if args.tiny else 'full-size SD1.5 U-Net, ViT-H/14 heads'}, CPU "
          f"({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"command: python benchmarks/concept.py {' '.join(sys.argv[1:])}")
    print(f"tune (e4t.tune, low_vram): trains {args.trains}, {args.steps} steps, batch {args.batch}, {args.res} px, "
          f"lr {args.lr}; {t_tune:.0f} s{' (read from the cache)' if cached else ''}; losses "
          f"{[round(x, 4) for x in result.losses]}; peak RSS so far {rss():.1f} GiB\n")

    # --- what the delta looks like -----------------------------------------------------------------
    ref = {f"encoder.{k}": v for k, v in s.encoder.state_dict().items() if not k.startswith("clip_vision.")}
    ref.update({f"offsets.{k}": v for k, v in to_published(s.offsets).items()})
    tuned_ = {f"encoder.{k}": v for k, v in result.encoder.state_dict().items() if not k.startswith("clip_vision.")}
    tuned_.update({f"offsets.{k}": v for k, v in to_published(result.offsets).items()})
    groups = {g: {k: tuned_[k].float() - ref[k].float() for k in ref if k.startswith(g + ".")}
              for g in ("encoder", "offsets")}
    groups["unet"] = result.unet_delta
    del tuned_, ref
    ranks, energies = (1, 4, 8, 16, 32, 64), (0.9, 0.99, 0.9999)
    print("| delta | matrices / elements | share of squared norm in top-r directions, r = " + ", ".join(map(str, ranks))
          + " | rank for " + ", ".join(f"{e:.2%}" for e in energies) + " of a matrix (median / largest) "
          "| bits/element of round(delta/lr) |\n|---|---|---|---|---|")
    for g, deltas in groups.items():
        bits, n = entropy(deltas, args.lr)
        shares, need = spectrum(deltas, ranks, energies)
        print(f"| {g} | {len(matrices(deltas))} / {n / 1e6:.1f} M | " + ", ".join(f"{x:.3f}" for x in shares) + " | "
              + ", ".join(f"{a:g} / {b}" for a, b in need.values()) + f" | {bits:.2f} |")
    signs = torch.cat([d.flatten()[:100000].float() for d in groups["unet"].values()])
    print(f"\nU-Net delta / (steps * lr): median |.| {float((signs.abs() / (args.steps * args.lr)).median()):.3f}, "
          f"share within 1 % of ± steps*lr: {float(((signs.abs() / (args.steps * args.lr) - 1).abs() < 0.01).float().mean()):.3f}\n")
    whole = exact_file_size(groups, s)
    del groups, signs
    sys.stdout.flush()

    # --- compressed concepts vs the exact one ------------------------------------------------------
    gen = torch.Generator().manual_seed(1)
    templates = ("a photo of sks", "a painting of sks in a forest", "sks wearing a hat, studio light")
    prompts = []
    for text in templates:
        ids = torch.tensor([[t for t, _ in s.clip.tokenize(text)["l"][0]]])
        prompts.append((ids, (ids[0] == 48136).nonzero()[0]))
    acp = e4t.sd1_alphas_cumprod()
    latent = s.vae_encode(s.image[None])[..., : args.res // 8, : args.res // 8]
    samples = []
    for t in (50, 250, 500, 750, 950):
        for k in range(len(prompts)):
            for _ in range(args.samples):
                n = torch.randn(latent.shape, generator=gen)
                x = acp[t].sqrt() * latent + (1 - acp[t]).sqrt() * n
                samples.append((x, torch.tensor([float(t)]), k))
    with tempfile.TemporaryDirectory(dir=os.environ.get("E4T_BENCH_TMP")) as tmp:
        from safetensors.torch import save_file
        originals = os.path.join(tmp, "unet.safetensors")
        save_file({k: v.detach().contiguous() for k, v in s.unet.state_dict().items()}, originals)
        t0 = time.time()
        untuned = outputs(s, source, samples, prompts, originals)
        t_outputs = time.time() - t0
        reference = outputs(s, exact, samples, prompts, originals)
        print(f"{len(samples)} samples: timesteps 50, 250, 500, 750, 950 x {len(prompts)} prompts x {args.samples} "
              f"noises, {args.res // 8}x{args.res // 8} latents, fp32; {t_outputs:.0f} s per concept\n")
        src_path = os.path.join(tmp, "source.safetensors")
        e4t.save(source, src_path, include_backbone=False)
        find = lambda name: src_path
        files = []
        for comp in compressions(args):
            meta = e4t.concept_metadata(host="bench", source="source", source_sha256=e4t.source_sha256(source),
                                        image_sha256="", base_fingerprint="", tune=cfg, losses=result.losses,
                                        compression=comp)
            concept = e4t.make_concept(source, result, tokens=s.features.tokens, image=torch.zeros(
                512, 512, 3, dtype=torch.uint8), metadata=meta)
            files.append((comp, os.path.join(tmp, f"c{len(files)}.safetensors")))
            e4t.save(concept, files[-1][1])
            del concept
        with torch.no_grad():                            # format 1's precision: tuned heads, offsets, U-Net delta in fp16
            for t in result.encoder.heads() + list(result.offsets.parameters()):
                t.copy_(t.half().float())
            exact.unet_delta = {k: v.half() for k, v in result.unet_delta.items()}
        fp16 = errors(outputs(s, exact, samples, prompts, originals), reference, untuned) if args.floor else None
        del result, exact                                # only the files from here on
        gc.collect()
        change = errors(untuned, reference, untuned)
        print("| concept | file | heads / offsets / U-Net / image+tokens | eps rel median / worst | eps of change "
              "median / worst | w rel median / worst | w of change median / worst | load / read |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| format 1 (fp16, whole) | {whole / 2**20:.1f} MiB | | | | | | |")
        print(f"| no change (the source) | | | {change['eps'][0]:.2%} / {change['eps'][1]:.2%} | 100 % | "
              f"{change['w'][0]:.2%} / {change['w'][1]:.2%} | 100 % | |")
        if fp16:
            print(f"| format 1 precision (fp16 whole, not written) | | | {fp16['eps'][0]:.3%} / {fp16['eps'][1]:.3%} | "
                  f"{fp16['eps'][2]:.1%} / {fp16['eps'][3]:.1%} | {fp16['w'][0]:.3%} / {fp16['w'][1]:.3%} | "
                  f"{fp16['w'][2]:.1%} / {fp16['w'][3]:.1%} | |")
        for comp, path in files:
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
            e = errors(outputs(s, loaded, samples, prompts, originals), reference, untuned)
            del loaded
            parts = " / ".join(f"{parts_of.get(g, 0) / 2**20:.1f}" for g in ("encoder", "offsets", "unet")) + \
                f" / {parts_of.get('concept', 0) / 2**20:.1f} MiB"
            print(f"| {label(comp)} | {size / 2**20:.1f} MiB | {parts} | {e['eps'][0]:.3%} / {e['eps'][1]:.3%} | "
                  f"{e['eps'][2]:.1%} / {e['eps'][3]:.1%} | {e['w'][0]:.3%} / {e['w'][1]:.3%} | "
                  f"{e['w'][2]:.1%} / {e['w'][3]:.1%} | {t_load * 1e3:.0f} ms / {t_read * 1e3:.0f} ms "
                  f"({t_load / t_read:.0f}x) |")
            sys.stdout.flush()
        again = outputs(s, source, samples[:1], prompts, originals)   # the U-Net was restored exactly each time
        assert torch.equal(again[0][1], untuned[0][1]), "the U-Net was not restored"
    print(f"\ntotal {time.time() - t_start:.0f} s, peak RSS {rss():.1f} GiB")


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
        b = {g: size(shapes, Compression(rank=r, unet_rank=r)) for g, shapes in groups.items()}
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
