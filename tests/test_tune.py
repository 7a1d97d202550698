import pytest
import torch

import e4t
from e4t import Offsets, TuneConfig, encode_with_word, targets
from e4t.losses import diffusion_loss, noisy
from tiny_models import text_model

PLACEHOLDER = "*"   # one CLIP token (id 265)


def text_encoder_fn(clip):
    """Differentiable: the host's CLIP weights are inference tensors, so it runs on clones of them."""
    encode_ids = e4t.WordInjector(text_model(clip)).on_copies()

    def encode(prompts, words):
        ids = [[t for t, _ in clip.tokenize(p)["l"][0]] for p in prompts]
        pos = [row.index(265) for row in ids]
        return encode_ids(torch.tensor(ids), words, torch.tensor(pos))
    return encode


class VaeCounter:
    def __init__(self, model, vae):
        self.model, self.vae, self.calls = model, vae, 0

    def __call__(self, images):
        self.calls += 1
        with torch.inference_mode():
            z = self.vae.encode(images.movedim(1, -1) * 0.5 + 0.5)
            return self.model.model.process_latent_in(z).clone()


def setup(model, clip, vae, encoder):
    torch.manual_seed(0)
    unet = model.model.diffusion_model
    offsets = Offsets(targets(unet.state_dict()), identity=False).requires_grad_(False)
    with torch.no_grad():
        for p in offsets.parameters():
            p.mul_(0.1)
    tm = text_model(clip)
    with torch.no_grad():
        empty = encode_with_word(tm, torch.tensor([[t for t, _ in clip.tokenize("")["l"][0]]]), None, torch.tensor([0]))
    kwargs = dict(text_encode=text_encoder_fn(clip), vae_encode=VaeCounter(model, vae),
                  e_domain=e4t.domain_embedding(tm, 1710), empty_context=empty,
                  alphas_cumprod=e4t.sd1_alphas_cumprod(), placeholder=PLACEHOLDER, clone_norm_inputs=True)
    image = torch.rand(3, 80, 64) * 2 - 1
    return unet, offsets, image, kwargs


def snapshot(*modules):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_gradients_reach_heads_offsets_and_unet_and_vae_runs_once(model, clip, vae, encoder):
    unet, offsets, image, kw = setup(model, clip, vae, encoder)
    cfg = TuneConfig(steps=2, batch_size=4, lr=1e-3, weight_decay=0.0, resolution=64)
    before = snapshot(unet, encoder, offsets)
    result = e4t.tune(unet, encoder, offsets, image, cfg=cfg, **kw)
    assert kw["vae_encode"].calls == 1
    assert same(before, snapshot(unet, encoder, offsets))                   # inputs untouched
    heads = dict(result.encoder.named_parameters())
    for name in ("unet_feature_embedder.0.weight", "feature_linear.weight", "first_linears.3.weight", "final_linear.bias"):
        assert not torch.equal(heads[name], dict(encoder.named_parameters())[name]), name
    assert torch.equal(result.encoder.clip_vision.conv1.weight, encoder.clip_vision.conv1.weight)
    moved = [t for t in offsets.targets if not torch.equal(result.offsets[t].linear_row.weight, offsets[t].linear_row.weight)]
    assert len(moved) == len(offsets.targets)
    assert len(result.unet_delta) == len(list(unet.parameters()))
    assert result.unet_delta["input_blocks.0.0.weight"].abs().max() > 0
    assert result.unet_delta["out.2.weight"].abs().max() > 0
    assert len(result.losses) == 2


def _fixed_loss(unet, result_or_none, offsets, encoder, image, kw, seed=123):  # noqa: C901
    """Loss on one fixed batch with the (tuned) weights W = (W0 + D)(1 + ΔW), computed independently."""
    from e4t.training import substituted
    g = torch.Generator().manual_seed(seed)
    enc, offs = (encoder, offsets) if result_or_none is None else (result_or_none.encoder, result_or_none.offsets)
    delta = {} if result_or_none is None else result_or_none.unet_delta
    with torch.no_grad():
        x0 = kw["vae_encode"](torch.nn.functional.interpolate(image[None], size=(64, 64)))
        x0 = x0.expand(4, -1, -1, -1)
        eps, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (4,), generator=g)
        xt = noisy(x0, eps, kw["alphas_cumprod"][t])
        weights = {k: v + delta.get(k, 0) for k, v in unet.named_parameters()}
        for k, d in offs.deltas().items():
            weights[k] = weights[k] * (1 + d)
        feats = enc.image_features(image[None])
        with substituted(unet, weights):
            w = kw["e_domain"] + 0.1 * enc(feats, e4t.unet_features(unet, xt, t, kw["empty_context"]))
            ctx = kw["text_encode"]([f"a photo of {PLACEHOLDER}"] * 4, w)
            pred = unet(xt, timesteps=t, context=ctx)
        return float(diffusion_loss(pred, eps))


def test_five_steps_lower_the_loss_on_a_fixed_batch(model, clip, vae, encoder):
    unet, offsets, image, kw = setup(model, clip, vae, encoder)
    before = _fixed_loss(unet, None, offsets, encoder, image, kw)
    result = e4t.tune(unet, encoder, offsets, image, cfg=TuneConfig(steps=5, batch_size=8, lr=3e-3, resolution=64), **kw)
    after = _fixed_loss(unet, result, offsets, encoder, image, kw)
    assert after < 0.95 * before, (before, after)


def test_interrupted_tune_changes_nothing(model, clip, vae, encoder):
    unet, offsets, image, kw = setup(model, clip, vae, encoder)
    before = snapshot(unet, encoder, offsets)
    seen = []
    with pytest.raises(e4t.Interrupted):
        e4t.tune(unet, encoder, offsets, image, cfg=TuneConfig(steps=5, batch_size=2, resolution=64, lr=1e-2),
                 progress=lambda s, n, loss: seen.append(s), should_stop=lambda: len(seen) >= 2, **kw)
    assert seen == [1, 2]
    assert same(before, snapshot(unet, encoder, offsets))


def tuned_both_ways(model, clip, vae, encoder, cfg, seed, **change):
    """The same tune twice, seeded alike (the VAE samples its posterior): as configured, and with `change`."""
    unet, offsets, image, kw = setup(model, clip, vae, encoder)
    results = []
    for c in (cfg, TuneConfig(**{**cfg.__dict__, **change})):
        torch.manual_seed(seed)
        results.append(e4t.tune(unet, encoder, offsets, image, cfg=c, **kw))
    return unet, offsets, image, kw, *results


def test_accumulation_keeps_the_loss_and_the_update(model, clip, vae, encoder):
    cfg = TuneConfig(steps=2, batch_size=8, lr=1e-3, resolution=64, reg_lambda=1e-3)
    _, offsets, _, _, one, four = tuned_both_ways(model, clip, vae, encoder, cfg, 5, accumulation=4)
    assert one.losses == pytest.approx(four.losses, rel=1e-5)
    t = offsets.targets[0]
    torch.testing.assert_close(one.offsets[t].linear_row.weight, four.offsets[t].linear_row.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(one.unet_delta["out.2.weight"], four.unet_delta["out.2.weight"], rtol=1e-3, atol=1e-7)


def test_layers_in_chunks_and_activations_held_on_the_cpu_give_the_same_tune(model, clip, vae, encoder, monkeypatch):
    """low_vram runs each checkpointed layer a few samples at a time (every SD layer works per sample) and holds what
    backward keeps in CPU memory on a GPU. Chunks: the same tune up to float rounding. Held activations (the hold
    made to run on this CPU, every size): bit-identical, and what is held is the layers' inputs, not weights."""
    from e4t import training
    cfg = TuneConfig(steps=2, batch_size=4, lr=1e-3, resolution=64, checkpointing=True, fused_step=True,
                     unet_weights="delta", optimizer_states="8bit")
    _, _, _, _, whole, chunks = tuned_both_ways(model, clip, vae, encoder, cfg, 9, layer_chunk=1)
    assert whole.losses == pytest.approx(chunks.losses, rel=1e-5)
    for k in ("out.2.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.1.0.in_layers.2.weight"):
        assert torch.nn.functional.cosine_similarity(whole.unet_delta[k].float().flatten(),
                                                     chunks.unet_delta[k].float().flatten(), dim=0) > 0.999
    held = []
    monkeypatch.setattr(training, "offloads", lambda device: True)
    monkeypatch.setattr(training, "HOLD_MIN_BYTES", 0)
    monkeypatch.setattr(training, "hold_on_cpu", lambda t: held.append(t) or t.clone())
    _, _, _, _, plain, offloaded = tuned_both_ways(model, clip, vae, encoder, cfg, 9, offload_activations=True)
    assert plain.losses == offloaded.losses
    assert all(torch.equal(plain.unet_delta[k], offloaded.unet_delta[k]) for k in plain.unet_delta)
    assert held and all(t.grad_fn is not None for t in held)
    assert any(t.dim() == 4 and t.shape[-2:] == (8, 8) for t in held)      # the U-Net layers' inputs (8x8 latents)


def test_checkpointing_gives_the_same_step(model, clip, vae, encoder):
    """Also across layouts: the plain tune trains in the whole-step layouts (flat masters, stacked first_linears),
    the checkpointed one a leaf per weight; sums in another order, so Adam's updates agree to rounding (largest
    where a gradient is near Adam's eps), not bit for bit."""
    cfg = TuneConfig(steps=2, batch_size=4, lr=1e-3, resolution=64)
    unet, _, _, _, plain, ckpt = tuned_both_ways(model, clip, vae, encoder, cfg, 9, checkpointing=True)
    assert plain.losses == pytest.approx(ckpt.losses, rel=1e-6)
    for k in ("out.2.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"):
        scale = float(plain.unet_delta[k].abs().max())
        torch.testing.assert_close(plain.unet_delta[k], ckpt.unet_delta[k], rtol=1e-4, atol=1e-4 * scale)
    assert not hasattr(unet.input_blocks[1], "forward") or "forward" not in unet.input_blocks[1].__dict__


def test_attention_only_trains_only_attention(model, clip, vae, encoder):
    unet, offsets, image, kw = setup(model, clip, vae, encoder)
    result = e4t.tune(unet, encoder, offsets, image, cfg=TuneConfig(steps=1, batch_size=2, resolution=64, trains="attention"), **kw)
    assert result.unet_delta and all(".attn1." in k or ".attn2." in k for k in result.unet_delta)


def test_mask_restricts_the_loss_to_masked_pixels_exactly():
    pred, tgt = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 1:7] = 1
    want = ((pred - tgt) ** 2)[..., 2:5, 1:7].mean()
    torch.testing.assert_close(diffusion_loss(pred, tgt, mask), want)
    outside = pred.clone()
    outside[..., 0, :] += 10
    assert torch.equal(diffusion_loss(outside, tgt, mask), diffusion_loss(pred, tgt, mask))


def result_tensors(result):
    return {**{f"e.{k}": v for k, v in result.encoder.state_dict().items() if not k.startswith("clip_vision.")},
            **{f"o.{k}": v for k, v in result.offsets.state_dict().items()},
            **{f"u.{k}": v for k, v in result.unet_delta.items()}}


def test_masked_tune_ignores_what_lies_outside_the_mask(model, clip, vae, encoder, monkeypatch):
    """Through the tune's own resize, crop, flip and latent downsampling, the loss mask lies exactly on the
    masked pixels of the crop, and the U-Net's errors on the other pixels change nothing: a tune whose
    prediction is corrupted where the image is outside the mask is bit-identical to a clean one (and
    differs when corrupted inside). The image carries its mask in its blue channel, and a block-local
    encoder stands in for the VAE, so each latent cell says which image pixels it holds."""
    import importlib
    import torch.nn.functional as F
    unet, offsets, _, kw = setup(model, clip, vae, encoder)
    mask = torch.zeros(80, 64)
    mask[13:51, 5:37] = 1                                          # off the 8-pixel grid, left of centre
    ramp = torch.linspace(-1, 1, 64).expand(80, 64)                # shows whether a crop was flipped
    image = torch.stack([ramp, torch.rand(80, 64) * 2 - 1, mask * 2 - 1])
    encoded = []

    def vae_encode(images):                                        # (n, 3, 64, 64) -> (n, 4, 8, 8), cell-local
        encoded.append(torch.cat([F.avg_pool2d(images, 8), F.avg_pool2d(images[:, :1], 8)], 1))
        return encoded[-1]
    training, losses_seen = importlib.import_module("e4t.training"), []
    loss = training.diffusion_loss

    def tune(seed, corrupt=None):
        encoded.clear()

        def corrupted(pred, tgt, m=None):
            inside = (encoded[0][:, 2:3] + 1) / 2                    # the crop's mask, read from its pixels
            losses_seen.append((m, inside))
            where = {"outside": inside == 0, "inside": inside == 1, None: torch.zeros_like(inside, dtype=bool)}[corrupt]
            return loss(pred + 10 * where, tgt, m)
        monkeypatch.setattr(training, "diffusion_loss", corrupted)
        cfg = TuneConfig(steps=2, batch_size=2, resolution=64, seed=seed)
        return e4t.tune(unet, encoder, offsets, image, cfg=cfg, mask=mask, **{**kw, "vae_encode": vae_encode})

    flips = set()
    for seed in (0, 1, 2):
        clean = result_tensors(tune(seed))
        flips.add(bool(encoded[0][0, 0, 0, 0] > encoded[0][0, 0, 0, -1]))
        outside = result_tensors(tune(seed, "outside"))
        assert all(torch.equal(clean[k], outside[k]) for k in clean), seed
    assert flips == {False, True}                                  # both flipped and unflipped crops were seen
    inside = result_tensors(tune(seed, "inside"))
    assert any(not torch.equal(clean[k], inside[k]) for k in clean)
    for m, want in losses_seen:                                     # the tune's mask is the crop's masked pixels
        assert torch.equal(m, want.expand_as(m))
    assert {float(v) for m, _ in losses_seen for v in m.unique()} > {0.0, 1.0}   # partly covered cells too


def test_presets():
    assert e4t.preset("face").reg_lambda == 0.1 and e4t.preset("face").steps == 15
    assert e4t.preset("cat", batch_size=4).lr == 3e-6 and e4t.preset("cat").steps == 5
    assert e4t.preset("published").reg_lambda == 1e-4 and e4t.preset("published").lr == 1.6e-5
    with pytest.raises(ValueError, match="face"):
        e4t.preset("dog")


def test_varied_augmentation_encodes_all_crops_once(model, clip, vae, encoder):
    unet, offsets, image, kw = setup(model, clip, vae, encoder)
    seen = []
    inner = kw["vae_encode"]
    kw["vae_encode"] = lambda images: (seen.append(images.shape[0]), inner(images))[1]
    e4t.tune(unet, encoder, offsets, image, cfg=TuneConfig(steps=3, batch_size=4, resolution=64,
                                                          augmentation="varied", n_augmentations=3), **kw)
    assert seen == [3]


def test_an_fp16_unet_tunes_without_autocast(model, clip, vae, encoder):
    """Hosts without CUDA autocast (CPU, Apple MPS) may hold fp16 weights: training then runs in fp32 copies."""
    import copy
    unet, offsets, image, kw = setup(model, clip, vae, encoder)
    unet16 = copy.deepcopy(unet).half()
    unet16.dtype = torch.float16                     # as ComfyUI builds an fp16 model
    before = {k: v.clone() for k, v in unet16.state_dict().items()}
    result = e4t.tune(unet16, encoder, offsets, image, cfg=TuneConfig(steps=2, batch_size=2, resolution=64), **kw)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert unet16.dtype == torch.float16 and all(torch.equal(v, before[k]) for k, v in unet16.state_dict().items())


def test_low_vram_optimizer_states_train_the_same_weights(model, clip, vae, encoder):
    cfg = TuneConfig(steps=2, batch_size=4, lr=1e-3, resolution=64)
    unet, offsets, image, kw, full, compact = tuned_both_ways(model, clip, vae, encoder, cfg, 9, optimizer_states="bf16")
    assert full.losses[0] == compact.losses[0]
    for k in ("out.2.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"):
        moved = full.unet_delta[k].norm()
        assert moved > 0 and (full.unet_delta[k] - compact.unet_delta[k]).norm() < 1e-2 * moved
    with pytest.raises(ValueError, match="optimizer_states"):
        e4t.tune(unet, encoder, offsets, image, cfg=TuneConfig(**{**cfg.__dict__, "optimizer_states": "int4"}), **kw)


def test_memory_modes_name_their_settings():
    assert e4t.memory_settings("fast") == {}
    assert e4t.memory_settings("low_vram") == dict(checkpointing=True, optimizer_states="8bit", unet_weights="delta",
                                                   fused_step=True, layer_chunk=4, offload_optimizer=True,
                                                   offload_activations=True)
    with pytest.raises(ValueError, match="memory mode"):
        e4t.memory_settings("auto")


def test_lean_tune_follows_the_fp32_adamw_tune(model, clip, vae, encoder):
    """low_vram (bf16 deltas on the frozen weights, 8-bit moments, the step inside backward, checkpointing, no global
    clipping) against fast (fp32 masters, torch's AdamW), 15 steps, fp32 tiny models: loss per step within 1 %, every
    U-Net delta pointing the same way (cosine >= 0.99). Except the weights whose gradient is rounding noise (biases
    right before a GroupNorm, 0 by symmetry; 18 of 434 here): Adam turns noise into full steps, so their direction
    differs between two fp32 runs as well (here: the same tune with its batch in two halves), and they are left out."""
    cfg = TuneConfig(steps=15, batch_size=4, lr=1e-4, resolution=64)
    _, _, _, _, fast, lean = tuned_both_ways(model, clip, vae, encoder, cfg, 3, **e4t.memory_settings("low_vram"))
    _, _, _, _, _, halves = tuned_both_ways(model, clip, vae, encoder, cfg, 3, accumulation=2)
    assert lean.losses == pytest.approx(fast.losses, rel=1e-2)

    def cosine(a, b, k):
        return float(torch.nn.functional.cosine_similarity(a.unet_delta[k].float().flatten(),
                                                           b.unet_delta[k].float().flatten(), dim=0))
    determined = [k for k in fast.unet_delta if cosine(fast, halves, k) > 0.999]
    assert len(fast.unet_delta) - 20 <= len(determined) < len(fast.unet_delta)
    worst = sorted((cosine(fast, lean, k), k) for k in determined)[:3]
    assert worst[0][0] >= 0.99, worst
    for k in ("first_linears.0.weight", "unet_feature_embedder.0.weight"):
        a, b = (dict(r.encoder.named_parameters())[k] - dict(encoder.named_parameters())[k] for r in (fast, lean))
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) >= 0.99


@pytest.mark.parametrize("memory", ["fast", "low_vram"])
def test_identity_offsets_tune_stays_finite(model, clip, vae, encoder, memory):
    """Identity offsets (ΔW = 0: linear_row exactly 0) gave NaN deltas in the bf16-moment path from step 3 on."""
    unet, _, image, kw = setup(model, clip, vae, encoder)
    offsets = Offsets(targets(unet.state_dict()), identity=True)
    result = e4t.tune(unet, encoder, offsets, image, cfg=TuneConfig(steps=5, batch_size=2, resolution=64, lr=1e-3,
                                                                     **e4t.memory_settings(memory)), **kw)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(torch.isfinite(d.float()).all() for d in result.unet_delta.values())
    assert all(torch.isfinite(p).all() for p in result.offsets.parameters())


@pytest.mark.parametrize("memory", ["fast", "low_vram"])
def test_a_loss_that_stops_being_finite_stops_the_tune_and_changes_nothing(model, clip, vae, encoder, memory):
    unet, offsets, image, kw = setup(model, clip, vae, encoder)
    before = snapshot(unet, encoder, offsets)
    inner = kw["text_encode"]
    calls = []

    def poisoned(prompts, words):                  # the second step's context turns into infinities
        calls.append(1)
        out = inner(prompts, words)
        return out * float("inf") if len(calls) > 1 else out
    kw["text_encode"] = poisoned
    with pytest.raises(e4t.Diverged, match="step 2 of 3.*nothing was changed.*learning rate"):
        e4t.tune(unet, encoder, offsets, image, cfg=TuneConfig(steps=3, batch_size=2, resolution=64,
                                                              **e4t.memory_settings(memory)), **kw)
    assert same(before, snapshot(unet, encoder, offsets))


def test_loss_scaling_gives_the_same_tune(model, clip, vae, encoder):
    """fp16's dynamic loss scaling multiplies the loss and divides the gradients: the same tune (fp32 here)."""
    cfg = TuneConfig(steps=2, batch_size=2, lr=1e-3, resolution=64)
    for memory in ("fast", "low_vram"):
        results = []
        for scale in (1.0, 1024.0):
            unet, offsets, image, kw = setup(model, clip, vae, encoder)
            results.append(e4t.tune(unet, encoder, offsets, image, precision=e4t.Precision(None, scale),
                                    cfg=TuneConfig(**{**cfg.__dict__, **e4t.memory_settings(memory)}), **kw))
        assert results[0].losses == pytest.approx(results[1].losses, rel=1e-5)
        for k in ("out.2.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"):
            torch.testing.assert_close(results[0].unet_delta[k].float(), results[1].unet_delta[k].float(),
                                       rtol=2e-2, atol=1e-6)


def test_tune_runs_on_a_clone_and_leaves_the_host_modules_alone(model, clip, vae, encoder):
    """Nothing is set on the host's modules, not even for a step: no forward overrides, hooks or swapped tensors."""
    unet, offsets, image, kw = setup(model, clip, vae, encoder)
    params = {n: p for n, p in unet.named_parameters()}
    seen = []
    block = unet.output_blocks[1]

    def watch(step, total, loss):
        seen.append(("forward" in block.__dict__, all(p is params[n] for n, p in unet.named_parameters())))
    for memory in ("fast", "low_vram"):
        e4t.tune(unet, encoder, offsets, image, progress=watch,
                 cfg=TuneConfig(steps=1, batch_size=2, resolution=64, **e4t.memory_settings(memory)), **kw)
    assert seen == [(False, True)] * 2
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())


def test_precision_policy():
    assert e4t.training_precision("cpu") == e4t.Precision(None)
    assert e4t.training_precision("cuda", half=False) == e4t.Precision(None)
    if torch.cuda.is_available():
        want = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
        assert e4t.training_precision("cuda").autocast == want


class OneStep:
    """One objective step (`e4t.training.Objective`) on a fixed batch and a structural clone of the tiny U-Net, with
    the offsets' and U-Net weights' layouts under test."""

    def __init__(self, model, clip, vae, encoder, seed):
        from e4t.training import structural_clone
        self.unet, self.offsets, image, self.kw = setup(model, clip, vae, encoder)
        self.encoder, self.work = encoder, structural_clone(self.unet)
        self.trained = {n for n, _ in self.work.named_parameters()}
        g = torch.Generator().manual_seed(seed)
        self.x0, self.noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        self.t = torch.randint(0, 1000, (2,), generator=g)
        with torch.no_grad():
            self.tokens = encoder.image_features(image[None]).tokens

    def __call__(self, offsets, weights, autocast_dtype=None):
        """(loss, the trainable heads) after one step's backward."""
        from e4t.training import Objective, training_mode
        from e4t.tune import trainable_heads
        heads, kw = trainable_heads(self.encoder), self.kw
        with training_mode(self.work, True):
            objective = Objective(self.work, heads, offsets, weights, kw["text_encode"], kw["e_domain"],
                                  kw["empty_context"], kw["alphas_cumprod"], 0.1, "eps", 1e-4,
                                  autocast_dtype=autocast_dtype)
            return objective.backward(self.tokens, self.x0, self.noise, self.t, [f"a photo of {PLACEHOLDER}"] * 2), heads


def test_offsets_stacked_by_shape_give_the_per_offset_step(model, clip, vae, encoder):
    """The tune trains the offsets stacked by weight shape (`OffsetGroups`, W' of all targets in a few kernels); one
    objective step with them gives the loss and the gradients of heads, offsets and U-Net that the file layout
    (`Offsets`, one merge per target, as pre-training keeps them) gives."""
    import copy
    from e4t.training import UNetWeights
    step = OneStep(model, clip, vae, encoder, seed=1)
    offsets, found = step.offsets, []
    for layout in (copy.deepcopy(offsets).float().requires_grad_(), e4t.OffsetGroups(offsets).requires_grad_()):
        weights = UNetWeights(step.work, step.trained, "master")
        loss, heads = step(layout, weights)
        grads = {f"heads.{n}": p.grad for n, p in heads.named_parameters() if p.requires_grad}
        grads.update({f"unet.{n}": g for n, g in unet_grads(weights).items()})
        if isinstance(layout, Offsets):
            grads.update({f"offsets.{k}.{n}": layout[k].get_parameter(n).grad for k in layout.targets
                          for n, _ in layout[k].named_parameters()})
        else:
            grads.update({f"offsets.{k}.{n}": stack[n.replace('.', '_')].grad[i]
                          for keys, stack in zip(layout.keys, layout.stacks) for i, k in enumerate(keys)
                          for n in e4t.offsets.PARAMS})
        found.append((loss, grads))
    (loss_a, a), (loss_b, b) = found
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert set(a) == set(b) and sum(k.startswith("offsets.") for k in a) == 9 * len(offsets.targets)
    unused = {k for k in a if a[k] is None}
    assert unused == {k for k in b if b[k] is None} and len(unused) < len(a) / 10, sorted(unused)[:5]
    scale = {}                       # the largest gradient of heads, offsets, U-Net: the floor of rounding noise
    for k in set(a) - unused:
        scale[k.split(".")[0]] = max(scale.get(k.split(".")[0], 0.0), float(a[k].abs().max()))
    for k in set(a) - unused:
        assert float((a[k] - b[k]).abs().max()) <= 1e-4 * float(a[k].abs().max()) + 1e-6 * scale[k.split(".")[0]], k


def unet_grads(weights) -> dict:
    """{trained U-Net weight: its gradient, flattened}, from flat master tensors or one leaf per weight."""
    if weights.segments:
        return {n: part for names, flat, _ in weights.segments
                for n, part in zip(names, flat.grad.split([weights.base[n].numel() for n in names]))}
    return {n: weights.tensors[n].grad.reshape(-1) for n in weights.trained}


def test_master_weights_in_flat_tensors_give_the_per_weight_step_with_fewer_kernels(model, clip, vae, encoder):
    """Under autocast (bf16 on the CPU here, as on a GPU) the fast tune's fp32 master weights live in three flat
    tensors: the layers' weights are cast once per step, not once per weight, and their gradients gathered in one
    kernel. One objective step gives the loss and, bit for bit, the gradients of one fp32 leaf per weight cast by
    autocast where it is used (`flat=False`, the layout of every other mode), with fewer kernel-launching
    operations."""
    from dispatch_count import Dispatched
    from e4t.training import UNetWeights
    step = OneStep(model, clip, vae, encoder, seed=2)
    found = []
    for flat in (False, True):
        weights = UNetWeights(step.work, step.trained, "master", cast=torch.bfloat16, merged=set(step.offsets.targets),
                              flat=flat)
        assert len(weights.trainable()) == (3 if flat else len(step.trained))
        with Dispatched() as counted:
            loss, _ = step(e4t.OffsetGroups(step.offsets).requires_grad_(), weights, autocast_dtype=torch.bfloat16)
        found.append((loss, unet_grads(weights), counted.kernels))
    (loss_a, a, kernels_a), (loss_b, b, kernels_b) = found
    assert loss_a == loss_b and set(a) == set(b) == set(step.trained)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in step.work.modules())
    assert kernels_b < kernels_a - layers, (kernels_a, kernels_b, layers)


def test_merging_in_pieces_gives_the_same_step(model, clip, vae, encoder, monkeypatch):
    """W' of a weight shape is merged MERGE_CHUNK elements at a time (SD1.5's largest shape in pieces, to bound the
    merge's temporaries); pieces of one weight each give the same loss and gradients, bit for bit."""
    from e4t import training
    from e4t.training import UNetWeights
    step = OneStep(model, clip, vae, encoder, seed=3)
    found = []
    for chunk in (training.MERGE_CHUNK, 1):
        monkeypatch.setattr(training, "MERGE_CHUNK", chunk)
        layout = e4t.OffsetGroups(step.offsets).requires_grad_()
        weights = UNetWeights(step.work, step.trained, "master", merged=set(step.offsets.targets))
        calls = []
        monkeypatch.setattr(training, "merge", lambda w, d, *a: calls.append(len(w)) or e4t.merge(w, d, *a))
        loss, _ = step(layout, weights)
        found.append((loss, [p.grad for p in list(layout.parameters()) + weights.trainable()], calls))
    (loss_a, a, calls_a), (loss_b, b, calls_b) = found
    assert len(calls_a) == len(layout.keys) and calls_b == [1] * len(step.offsets.targets)
    assert loss_a == loss_b and all(torch.equal(x, y) for x, y in zip(a, b))
