import torch

from e4t import Offsets, applied, merge, targets
from tiny_models import SD15_UNET
from e4t.offsets import (Offset, compvis_block_to_diffusers, diffusers_block_to_compvis, published_to_target,
                         target_to_published, weight_change)


def reference_delta(off: Offset) -> torch.Tensor:
    """The published computation, step by step with dense products: outer, columnwise, rowwise."""
    vx, vy = off.linear1(off.v), off.linear2(off.v)
    m = vx[:, None] * vy[None, :]                    # (in, out)
    m = off.linear_column(m.T)                        # (out, in)
    m = off.linear_row(m.T)                           # (in, out)
    return m.T


def test_delta_equals_published_formula_and_has_rank_3():
    torch.manual_seed(0)
    off = Offset(24, 40, identity=False).double()
    delta = off.delta()
    assert delta.shape == (40, 24)
    torch.testing.assert_close(delta, reference_delta(off), rtol=1e-12, atol=1e-12)
    assert torch.linalg.matrix_rank(delta).item() == 3


def test_identity_init_is_zero_and_published_init_is_not():
    assert Offset(8, 8).delta().abs().max() == 0
    torch.manual_seed(0)
    assert Offset(64, 64, identity=False).delta().std() > 0.05


def test_applied_gives_w0_times_one_plus_delta_and_restores_originals(unet):
    torch.manual_seed(0)
    shapes = targets(unet.state_dict())
    offsets = Offsets(shapes, identity=False)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    deltas = {k: d.detach() for k, d in offsets.deltas().items()}
    with applied(unet, deltas, strength=0.5):
        now = unet.state_dict()
        for key, delta in deltas.items():
            assert torch.equal(now[key], merge(before[key], delta, 0.5))
            torch.testing.assert_close(now[key], before[key] * (1 + 0.5 * delta), rtol=1e-6, atol=1e-7)
        assert sum(not torch.equal(now[k], before[k]) for k in before) == len(deltas)
    for key, value in unet.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_one_weight_rule_tuned_delta_then_offsets():
    """W' = (W + s·D) ⊙ (1 + s·ΔW), the rule every host applies (A1111's hooks call `weight_change`), checked
    in float64 against the formula; D alone adds s·D, ΔW alone scales W; nothing given changes nothing."""
    g = torch.Generator().manual_seed(0)
    w, d, dw = (torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for s in (1.0, 0.7, -0.3):
        exact = (w + s * d) * (1 + s * dw) - w
        torch.testing.assert_close(weight_change(w.float(), dw.float(), d.float(), s).double(), exact,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weight_change(w.float(), added=d.float(), strength=s).double(), s * d,
                                   rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(weight_change(w.float(), dw.float(), strength=s).double(), s * w * dw,
                                   rtol=1e-6, atol=1e-7)
        assert torch.equal(merge(w.float(), dw.float(), s, d.float()),
                           w.float() + weight_change(w.float(), dw.float(), d.float(), s))
    assert weight_change(w) is None and torch.equal(merge(w), w)
    half = w.half()
    assert weight_change(half, dw.half(), d.half(), 0.5).dtype == torch.float32    # fp32 whatever W's dtype


def full_sd15_unet_state():
    """The full-size SD1.5 U-Net's state dict as ComfyUI builds it, on the meta device (no memory)."""
    import comfy.supported_models
    with torch.device("meta"):
        cfg = comfy.supported_models.SD15(dict(SD15_UNET))
        cfg.set_inference_dtype(torch.float32, None)
        return cfg.get_model({}).diffusion_model.state_dict()


def test_key_maps_agree_with_comfyui_on_the_full_sd15_unet(comfy):
    import comfy.utils
    ours = targets(full_sd15_unet_state())
    assert len(ours) == 96                                    # 16 blocks x attn1/attn2 x q/k/v
    host = {v: k for k, v in comfy.utils.unet_to_diffusers(dict(SD15_UNET)).items()}   # CompVis -> diffusers
    published = set()
    for target in ours:
        diffusers = host[target]
        block = diffusers.split(".transformer_blocks.")[0]
        assert diffusers_block_to_compvis(block) == target.split(".transformer_blocks.")[0]
        assert compvis_block_to_diffusers(target.split(".transformer_blocks.")[0]) == block
        for param in ("v", "linear1.weight", "linear_row.bias"):
            key = target_to_published(target, param)
            assert published_to_target(key) == (target, param)
            published.add(key.rsplit(".wo_", 1)[0])
    assert len(published) == 32   # 16 blocks x {attn1, attn2}


def test_published_offset_count_and_params_on_full_sd15(comfy):
    with torch.device("meta"):
        offsets = Offsets(targets(full_sd15_unet_state()))
    from e4t.offsets import to_published
    keys = to_published(offsets)
    assert len(keys) == 864
    assert sum(v.numel() for v in keys.values()) == 143_226_592
