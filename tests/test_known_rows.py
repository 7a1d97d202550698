"""KnownRows: a batched U-Net call whose unconditional rows' down/mid outputs come from the feature pass
computes the same output as the whole call, with the FLOPs of the whole call and no more
(tiny ComfyUI U-Net)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from e4t import KnownRows, unet_features


def _call(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, timesteps=t, context=ctx)


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _batch(rows: slice, batch=3, seed=0):
    """A CFG-like batch: the rows `rows` are the unconditional ones (one latent per image, the empty context)."""
    g = torch.Generator().manual_seed(seed)
    n = rows.stop - rows.start
    x_img, empty = torch.randn(n, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 77, 32, generator=g)
    x[rows], ctx[rows] = x_img, empty
    return x, torch.full((batch,), 421.0), ctx, x_img, empty


@pytest.mark.parametrize("rows", [slice(2, 3), slice(0, 1), slice(1, 2), slice(1, 3)],
                         ids=["last (A1111)", "first", "middle", "two of three"])
def test_known_rows_give_the_whole_calls_output(unet, rows):
    x, t, ctx, x_u, empty = _batch(rows)
    whole = _call(unet, x, t, ctx)
    with torch.no_grad():
        maps = unet_features(unet, x_u, t[:x_u.shape[0]], empty)
    known = KnownRows.down_path(unet, maps, x.shape[0], rows).install()
    seen = {}
    down = [layer for block in list(unet.input_blocks) + [unet.middle_block] for layer in block.children()]
    probes = [m.register_forward_hook(lambda m, a, o, k=k: seen.setdefault(k, []).append(a[0].shape[0]))
              for k, m in (("down", layer) for layer in down)]
    up = next(unet.output_blocks[0].children())
    probes.append(up.register_forward_pre_hook(lambda m, a: seen.setdefault("up", []).append(a[0].shape[0])))
    try:
        shared = _call(unet, x, t, ctx)
    finally:
        known.remove()
        for p in probes:
            p.remove()
    others = x.shape[0] - x_u.shape[0]
    assert set(seen["down"]) == {others} and len(seen["down"]) == len(down), seen
    assert seen["up"] == [x.shape[0]]
    assert known.spliced == len(maps)
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    assert not torch.equal(shared[rows], _call(unet, x, t, torch.randn_like(ctx))[rows])   # the rows do matter
    assert not unet._forward_hooks and not any(m._forward_pre_hooks or m._forward_hooks for m in down)


def test_feature_pass_and_shared_call_cost_the_flops_of_the_whole_call(unet):
    rows = slice(1, 2)
    x, t, ctx, x_u, empty = _batch(rows, batch=2)
    plain = _flops(lambda: _call(unet, x, t, ctx))
    with torch.no_grad():
        feature = _flops(lambda: unet_features(unet, x_u, t[:1], empty))
        maps = unet_features(unet, x_u, t[:1], empty)
    known = KnownRows.down_path(unet, maps, 2, rows).install()
    try:
        shared = _flops(lambda: _call(unet, x, t, ctx))
    finally:
        known.remove()
    # the only work done twice: the timestep's embedding MLP for the known row (two Linear layers)
    time_embed = 2 * sum(m.weight.numel() for m in unet.time_embed if isinstance(m, torch.nn.Linear))
    assert feature > 0.1 * plain
    assert feature + shared == plain + time_embed, (feature, shared, plain, time_embed)


def test_a_call_of_another_batch_is_left_whole(unet):
    rows = slice(1, 2)
    x, t, ctx, x_u, empty = _batch(rows, batch=2)
    with torch.no_grad():
        maps = unet_features(unet, x_u, t[:1], empty)
    other = torch.randn(3, 4, 8, 8), torch.full((3,), 421.0), torch.randn(3, 77, 32)
    whole = _call(unet, *other)
    known = KnownRows.down_path(unet, maps, 2, rows).install()
    try:
        got = _call(unet, *other)
    finally:
        known.remove()
    assert known.spliced == 0 and torch.equal(got, whole)


def test_maps_must_match_the_blocks(unet):
    with pytest.raises(ValueError, match="maps for"):
        KnownRows.down_path(unet, [torch.zeros(1)], 2, slice(1, 2))
