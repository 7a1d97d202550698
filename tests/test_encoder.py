import copy

import pytest
import torch
import torch.nn.functional as F

from e4t import Refinement, encode_with_word, predict_embedding, unet_features
from e4t.encoder import CLIP_MEAN, CLIP_STD, build_backbone, clip_tokens, preprocess


def reference_encoder(encoder, image, maps):
    """The published forward step by step: open_clip's own forward with pre-2.23 token semantics
    (final_ln_after_pool: ln_post on the pooled CLS only), then 129 separate linears and a mean."""
    from open_clip.transformer import VisionTransformer
    cfg = encoder.cfg
    vit = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.vit_patch, width=cfg.vit_width,
                            layers=cfg.vit_layers, heads=cfg.vit_heads, mlp_ratio=cfg.vit_mlp_ratio,
                            output_dim=cfg.vit_width, final_ln_after_pool=True, output_tokens=True)
    vit.proj = None
    vit.load_state_dict(encoder.clip_vision.state_dict())
    x = F.interpolate(image, size=(cfg.image_size,) * 2, mode="bicubic", align_corners=True)
    x = ((x + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    u = encoder.unet_feature_embedder(torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=-1))
    pooled, hidden = vit(x.expand(u.shape[0], -1, -1, -1))
    hidden = torch.cat([pooled[:, None], hidden[:, 1::2]], dim=1)
    outs = [encoder.first_linears[i](encoder.feature_linear(torch.cat([hidden[:, i], u], -1)))
            for i in range(hidden.shape[1])]
    return encoder.final_linear(torch.nn.LeakyReLU()(torch.stack(outs).mean(0)))


def _maps(unet, seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    return unet_features(unet, x, torch.tensor([500] * b), torch.randn(1, 77, 32, generator=g))


def test_encoder_equals_the_published_forward(encoder, unet):
    image = torch.rand(1, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        maps = _maps(unet)
        assert len(maps) == 7 and sum(m.shape[1] for m in maps) == encoder.cfg.unet_dim
        want = reference_encoder(encoder, image, maps)
        feats = encoder.image_features(image)
        assert feats.tokens.shape == (1, encoder.cfg.n_tokens, encoder.cfg.vit_width)
        got = encoder(feats, maps)
        folded = encoder.fold(feats)(maps)
    assert got.shape == (2, encoder.cfg.word_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded, want, rtol=1e-5, atol=1e-6)


def test_tokens_are_the_same_with_old_and_new_open_clip_normalisation(encoder):
    """open_clip >= 2.23 layer-norms all tokens by default; ours must not depend on that."""
    from open_clip.transformer import VisionTransformer
    cfg = encoder.cfg
    pixels = preprocess(torch.rand(2, 3, 32, 32) * 2 - 1, cfg.image_size)
    kw = dict(image_size=cfg.image_size, patch_size=cfg.vit_patch, width=cfg.vit_width, layers=cfg.vit_layers,
              heads=cfg.vit_heads, mlp_ratio=cfg.vit_mlp_ratio, output_dim=cfg.vit_width, output_tokens=True)
    old, new = VisionTransformer(final_ln_after_pool=True, **kw), VisionTransformer(**kw)
    for vit in (old, new):
        vit.proj = None
        vit.load_state_dict(encoder.clip_vision.state_dict())
    with torch.no_grad():
        ours_old, ours_new = clip_tokens(old, pixels), clip_tokens(new, pixels)
        pooled, raw = old(pixels)
        _, normed = new(pixels)
    assert torch.equal(ours_old, ours_new)
    torch.testing.assert_close(ours_old[:, 1:], raw[:, 1::2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_old[:, 0], pooled, rtol=1e-6, atol=1e-6)
    assert (ours_old[:, 1:] - normed[:, 1::2]).abs().max() > 1e-2    # the hazard is real


def test_backbone_is_built_without_download_and_has_no_projection(encoder):
    vit = build_backbone(encoder.cfg)
    assert vit.proj is None
    assert set(vit.state_dict()) == {k[len("clip_vision."):] for k in encoder.state_dict() if k.startswith("clip_vision.")}


def test_embedding_changes_with_timestep_and_latent_and_freezes_after_t_stop(encoder, unet):
    torch.manual_seed(0)
    folded = encoder.fold(encoder.image_features(torch.rand(1, 3, 32, 32) * 2 - 1))
    e_dom, empty = torch.randn(32), torch.randn(1, 77, 32)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        w = lambda x, t: predict_embedding(folded, unet, x, torch.tensor([t]), empty, e_dom, 0.1)
        assert not torch.equal(w(x, 900), w(x, 100))
        assert not torch.equal(w(x, 500), w(x + 0.5 * torch.randn_like(x), 500))
        torch.testing.assert_close(w(x, 500), w(x.clone(), 500), rtol=0, atol=0)
    refine = Refinement(folded, e_dom, empty, scale=0.1, t_stop=400)
    outs = [refine(unet, torch.randn(1, 4, 8, 8), torch.tensor([t])) for t in (999, 700, 450, 300, 100)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert torch.equal(outs[2], outs[3]) and torch.equal(outs[3], outs[4])       # frozen below t_stop
    assert [t for t, _ in refine.history] == [999, 700, 450]
    again = refine(unet, torch.randn(1, 4, 8, 8), torch.tensor([999]))     # a new run starts afresh
    assert not torch.equal(again, outs[4]) and [t for t, _ in refine.history] == [999]


def test_feature_pass_matches_the_unet_down_path(unet):
    """The maps are the U-Net's own skip tensors: compare with ComfyUI's forward via hooks."""
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.tensor([321])
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in list(unet.input_blocks) + [unet.middle_block]]
    with torch.no_grad():
        unet(x, timesteps=t, context=ctx)
        ours = unet_features(unet, x, t, ctx)
    for h in hooks:
        h.remove()
    assert len(ours) == len(seen) == 7
    for a, b in zip(ours, seen):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_text_encoding_with_word_equals_comfyui(clip):
    """Out-of-place CLIP forward == ComfyUI's own encode; an injected word == ComfyUI's tensor splice."""
    from tiny_models import text_model
    tm = text_model(clip)
    tokens = clip.tokenize("a photo of a face")
    ids = torch.tensor([[t for t, _ in tokens["l"][0]]])
    with torch.no_grad():
        want, _ = clip.encode_from_tokens(tokens, return_pooled=True)
        got = encode_with_word(tm, ids, None, torch.tensor([0]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        word = torch.randn(32)
        spliced = copy.deepcopy(tokens)
        spliced["l"][0][4] = (word, 1.0)
        want_w, _ = clip.encode_from_tokens(spliced, return_pooled=True)
        got_w = encode_with_word(tm, ids, word[None], torch.tensor([4]))
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)
        assert (got_w - got).abs().max() > 1e-3


@pytest.mark.parametrize("slots,n_layers", [([4], None), ([4, 9], None), ([30], 1), ([], None)])
def test_slot_encoder_equals_encoding_the_whole_sequence(clip, slots, n_layers):
    """Keys and values of the positions before the first slot, kept once, and the rest run per batch of words:
    equal (fp32, 1e-6) to running every position for each word; the kept part really does not change."""
    from e4t import SlotEncoder, input_embeddings
    from tiny_models import text_model
    tm = text_model(clip)
    ids = torch.tensor([t for t, _ in clip.tokenize("a photo of a face in the park at night")["l"][0]])
    words = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoder = SlotEncoder(tm, input_embeddings(tm, ids, {}, torch.float32, "cpu"), slots, n_layers)
        got = encoder(words)
        x = tm.embeddings.token_embedding(ids)[None].repeat(3, 1, 1)
        for s in slots:
            x[:, s] = words
        x = x + tm.embeddings.position_embedding.weight[:77]
        for layer in tm.encoder.layers[: n_layers or len(tm.encoder.layers)]:
            x = x + layer.self_attn(layer.layer_norm1(x), torch.full((77, 77), float("-inf")).triu_(1),
                                    lambda q, k, v, heads, mask: F.scaled_dot_product_attention(
                                        *(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)),
                                        attn_mask=mask).transpose(1, 2).flatten(2))
            x = x + layer.mlp(layer.layer_norm2(x))
        want = tm.final_layer_norm(x)
        if not slots:
            got = got.expand(3, -1, -1)
        else:
            assert encoder.start == slots[0] and not torch.equal(got[0], got[1])
    assert got.shape == (3, 77, 32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_stacked_first_linears_give_the_published_forward_gradients_and_weights(encoder, unet):
    """The tune's layout of the heads (`StackedLinears`: the n first_linears as one tensor) gives the published
    forward and every linear's gradient, in a few kernels instead of a few per linear; unstacking gives the
    published weights back bit for bit."""
    from dispatch_count import Dispatched
    from e4t.encoder import StackedLinears

    image = torch.rand(1, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        maps, feats = _maps(unet, seed=4), encoder.image_features(image)
        want = reference_encoder(encoder, image, maps)
    published = copy.deepcopy(encoder).requires_grad_()
    stacked = copy.deepcopy(encoder).stack_first_linears().requires_grad_()
    assert isinstance(stacked.first_linears, StackedLinears) and stacked.first_linears.weight.dtype == torch.float32
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    kernels = []
    for heads in (published, stacked):
        with Dispatched() as counted:
            out = heads(feats, maps)
            (out * probe).sum().backward()
        kernels.append(counted.kernels)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    n = encoder.cfg.n_tokens
    assert kernels[1] < kernels[0] - 3 * n, kernels
    for i, lin in enumerate(published.first_linears):
        for name in ("weight", "bias"):
            ours, theirs = getattr(stacked.first_linears, name).grad[i], getattr(lin, name).grad
            assert float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max()), (i, name)
    for (name, p), (_, q) in zip(published.named_parameters(), stacked.named_parameters()):
        if not name.startswith(("clip_vision.", "first_linears.")):
            assert float((p.grad - q.grad).abs().max()) <= 1e-5 * float(p.grad.abs().max()), name
    back = stacked.unstack_first_linears().state_dict()
    assert list(back) == list(encoder.state_dict())
    assert all(torch.equal(back[k], v) for k, v in encoder.state_dict().items())
