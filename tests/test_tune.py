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


def test_checkpointing_gives_the_same_step(model, clip, vae, encoder):
    cfg = TuneConfig(steps=2, batch_size=4, lr=1e-3, resolution=64)
    unet, _, _, _, plain, ckpt = tuned_both_ways(model, clip, vae, encoder, cfg, 9, checkpointing=True)
    assert plain.losses == pytest.approx(ckpt.losses, rel=1e-6)
    for k in ("out.2.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"):
        torch.testing.assert_close(plain.unet_delta[k], ckpt.unet_delta[k], rtol=1e-4, atol=1e-8)
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


def test_compact_adamw_follows_adamw_with_bf16_moments():
    """Moments stored in bf16, the update in fp32: 15 steps land where torch's AdamW lands, to well under 1 %
    of the distance travelled, however the parameters are chunked; the state holds half of AdamW's bytes."""
    torch.manual_seed(0)
    params = [torch.randn(64, 48).requires_grad_() for _ in range(3)] + [torch.randn(7).requires_grad_()]
    start = [p.detach().clone() for p in params]
    runs = [[p.detach().clone().requires_grad_() for p in params] for _ in range(3)]
    opts = [torch.optim.AdamW(runs[0], lr=1e-2, weight_decay=0.01),
            e4t.CompactAdamW(runs[1], lr=1e-2, weight_decay=0.01),
            e4t.CompactAdamW(runs[2], lr=1e-2, weight_decay=0.01, chunk=3000)]   # several chunks
    for step in range(15):
        grads = [torch.randn_like(p) * (1 + step) for p in params]
        for run, opt in zip(runs, opts):
            for p, g in zip(run, grads):
                p.grad = g.clone()
            opt.step()
    for ref, compact, chunked, p0 in zip(*runs, start):
        travelled = (ref - p0).norm()
        assert travelled > 0.05
        assert (compact - ref).norm() < 5e-3 * travelled
        assert (chunked - ref).norm() < 5e-3 * travelled
    state = opts[1].state[runs[1][0]]
    assert state["m"].dtype == state["v"].dtype == torch.bfloat16
    assert not torch.equal(state["v"], torch.zeros_like(state["v"]))


def test_compact_adamw_second_moment_is_unbiased_over_a_long_tune():
    """v moves by 0.1 % a step, under bf16's resolution: rounded to nearest it drifts (+2 % after 500 steps
    here); stochastic rounding keeps it on torch's AdamW's value."""
    torch.manual_seed(0)
    start = torch.randn(4000)
    ref, compact = start.clone().requires_grad_(), start.clone().requires_grad_()
    opts = torch.optim.AdamW([ref], lr=1e-3), e4t.CompactAdamW([compact], lr=1e-3)
    for _ in range(500):
        g = torch.randn(4000)
        ref.grad, compact.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    v_ref, v = opts[0].state[ref]["exp_avg_sq"], opts[1].state[compact]["v"].float()
    assert abs(((v - v_ref) / v_ref).mean()) < 0.005


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
    assert e4t.memory_settings("fast", 16) == {}
    assert e4t.memory_settings("low_vram", 16) == dict(checkpointing=True, accumulation=4, optimizer_states="bf16")
    assert e4t.memory_settings("low_vram", 6)["accumulation"] == 1          # the batch must divide evenly
    with pytest.raises(ValueError, match="memory mode"):
        e4t.memory_settings("auto", 16)
