import torch

from e4t import OffsetGroups, Offsets, applied, merge, targets
from tiny_models import SD15_UNET
from e4t.offsets import (PARAMS, Offset, compvis_block_to_diffusers, diffusers_block_to_compvis, published_to_target,
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


def _random_offsets(shapes, seed=0):
    torch.manual_seed(seed)
    offsets = Offsets(shapes, identity=False)
    with torch.no_grad():
        for p in offsets.parameters():
            p.add_(torch.randn_like(p) * 0.1)          # every parameter matters, biases of linear_row included
    return offsets


def test_offset_groups_give_each_offsets_delta_gradients_and_parameters(unet):
    """The tune's layout (`OffsetGroups`: parameters stacked by weight shape) gives every target's ΔW and, for any
    loss, every parameter's gradient as the file layout does; `offsets()` gives the parameters back bit for bit."""
    offsets = _random_offsets(targets(unet.state_dict()))
    groups = OffsetGroups(offsets)
    assert len(groups.keys) == len(set(targets(unet.state_dict()).values())) > 1
    g = torch.Generator().manual_seed(1)
    probe = {k: torch.randn(s, generator=g) for k, s in targets(unet.state_dict()).items()}
    per_offset, stacked = offsets.deltas(), groups.deltas()
    assert set(stacked) == set(per_offset)
    for k in per_offset:                               # the same sums in another order (bmm, not mv): rounding
        assert float((stacked[k] - per_offset[k]).detach().abs().max()) <= 1e-6 * float(per_offset[k].detach().abs().max()), k
    sum((probe[k] * d).sum() for k, d in per_offset.items()).backward()
    sum((probe[k] * d).sum() for k, d in stacked.items()).backward()
    for keys, stack in zip(groups.keys, groups.stacks):
        for name in PARAMS:
            for i, k in enumerate(keys):
                ours, theirs = stack[name.replace(".", "_")].grad[i], offsets[k].get_parameter(name).grad
                assert float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max()), (k, name)
    back = groups.offsets()
    assert back.targets == offsets.targets
    with torch.no_grad():
        for p in groups.parameters():                  # copies: training the groups on does not reach them
            p.add_(1.0)
    for (name, a), (_, b) in zip(back.named_parameters(), offsets.named_parameters()):
        assert torch.equal(a, b) and a.grad_fn is None and a.grad is None, name


def test_a_groups_delta_dispatches_the_same_operations_however_many_offsets_it_holds():
    """ΔW of a group is a fixed number of kernels forward and backward (the tune step is launch-bound on a GPU);
    in the file layout the count grows with every offset."""
    from dispatch_count import Dispatched

    def ops(layout):
        with Dispatched() as counted:
            sum(delta.sum() for _, delta in layout.grouped()).backward()
        return counted.ops
    few, many = ({f"b.{i}.transformer_blocks.0.attn1.to_q.weight": (6, 4) for i in range(n)} for n in (2, 6))
    assert ops(OffsetGroups(_random_offsets(few))) == ops(OffsetGroups(_random_offsets(many)))
    assert ops(_random_offsets(many)) > ops(_random_offsets(few)) + 4 * 9
