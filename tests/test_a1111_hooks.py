"""The A1111 extension's forward hooks (e4t_a1111/hooks.py, pure torch) on a tiny CompVis-layout U-Net.

No webui needed: the hooks must compute exactly W' = (W + sD)(1 + sΔW) on the weight as the module
holds it at call time (what the built-in Lora extension leaves there), and leave no trace when removed.
"""
import copy
import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_hooks():
    if "e4t_a1111" not in sys.modules:      # by path, like conftest loads e4t: the root stays off sys.path
        spec = importlib.util.spec_from_file_location("e4t_a1111", os.path.join(ROOT, "e4t_a1111", "__init__.py"),
                                                      submodule_search_locations=[os.path.join(ROOT, "e4t_a1111")])
        sys.modules["e4t_a1111"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["e4t_a1111"])
    from e4t_a1111 import hooks
    return hooks


def concept(unet, seed=0):
    """Offsets on every q/k/v and a tuned delta on every U-Net parameter (conv, linear, norms, biases)."""
    import e4t
    g = torch.Generator().manual_seed(seed)
    offsets = {k: torch.randn(shape, generator=g) * 0.2 for k, shape in e4t.targets(unet.state_dict()).items()}
    delta = {n: torch.randn(p.shape, generator=g) * 0.02 for n, p in unet.named_parameters()}
    return offsets, delta


def merged(unet, offsets, delta, s):
    """A copy of the U-Net with W' = (W + sD)(1 + sΔW) written into its weights."""
    import e4t
    m = copy.deepcopy(unet)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(e4t.merge(p.float(), offsets.get(name), s, delta.get(name)))
    return m


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 250.0]), torch.randn(2, 77, 32, generator=g)


def test_hooks_compute_merged_weights(unet):
    hooks = load_hooks()
    offsets, delta = concept(unet)
    x, t, ctx = inputs()
    with torch.no_grad():
        expected = merged(unet, offsets, delta, 0.7)(x, t, ctx)
        h = hooks.WeightHooks(unet, offsets, delta, 0.7).apply()
        got = unet(x, t, ctx)
        h.remove()
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-4, f"hooked U-Net differs from the merged-weight U-Net by {err:.2e} (relative)"


def test_hooks_follow_the_weight_as_held_at_call_time(unet):
    """A weight edited in place (as Lora does) is the W that the offsets multiply."""
    hooks = load_hooks()
    offsets, delta = concept(unet)
    key = next(iter(offsets))
    module = unet.get_submodule(key.rpartition(".")[0])
    x = torch.randn(3, module.in_features)
    with torch.inference_mode():                # the tiny U-Net's tensors are inference tensors
        lora = torch.randn_like(module.weight) * 0.1
        original = module.weight.clone()
        module.weight.add_(lora)
        h = hooks.WeightHooks(unet, {key: offsets[key]}, {key: delta[key]}, 1.0).apply()
        got = module(x)
        h.remove()
        module.weight.copy_(original)
    want = torch.nn.functional.linear(x, (original + lora + delta[key]) * (1 + offsets[key]))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


def test_removed_hooks_leave_the_unet_bit_identical(unet):
    hooks = load_hooks()
    offsets, delta = concept(unet)
    x, t, ctx = inputs()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    n_hooks = sum(len(m._forward_hooks) + ("forward" in vars(m)) for m in unet.modules())
    with torch.no_grad():
        plain = unet(x, t, ctx)
        h = hooks.WeightHooks(unet, offsets, delta, 1.0).apply()
        changed = unet(x, t, ctx)
        h.remove()
        again = unet(x, t, ctx)
    assert not torch.equal(plain, changed), "the hooks changed nothing"
    assert torch.equal(plain, again), "output not identical after removing the hooks"
    assert sum(len(m._forward_hooks) + ("forward" in vars(m)) for m in unet.modules()) == n_hooks, "forwards left"
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a U-Net tensor was written"


def test_strength_zero_registers_nothing(unet):
    hooks = load_hooks()
    offsets, delta = concept(unet)
    assert not hooks.WeightHooks(unet, offsets, delta, 0.0).apply().active


@pytest.mark.parametrize("bad", ["shape", "name"])
def test_mismatched_weights_are_a_clear_error(unet, bad):
    hooks = load_hooks()
    offsets, _ = concept(unet)
    key = next(iter(offsets))
    wrong = {key: torch.zeros(3, 3)} if bad == "shape" else {"input_blocks.99.1.proj_in.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="SD1.x"):
        hooks.WeightHooks(unet, {}, wrong, 1.0)


def _plain_copy(unet):
    """A copy whose tensors are ordinary (the fixture's are inference tensors, which keep no version)."""
    with torch.inference_mode(False):
        m = copy.deepcopy(unet)
        for p in list(m.parameters()) + list(m.buffers()):
            p.data = p.data.clone()
    return m


def test_weight_changes_are_computed_once_per_weight_version(unet, monkeypatch):
    """After the first call (which checks the module's own forward) W' is reused, not recomputed, and the outputs
    are bit-identical to computing it on every call."""
    hooks = load_hooks()
    unet = _plain_copy(unet)
    offsets, delta = concept(unet)
    x, t, ctx = inputs()
    calls = []
    compute = hooks.weight_change
    monkeypatch.setattr(hooks, "weight_change", lambda *a: calls.append(1) or compute(*a))
    with torch.no_grad():
        h = hooks.WeightHooks(unet, offsets, delta, 0.7).apply()
        cached, counts = [], []
        for _ in range(3):
            cached.append(unet(x, t, ctx))
            counts.append(len(calls))
        merged_later = sum(not layer.norm and layer.plain for layer in h.layers)   # the first call's W' - W not kept
        h.remove()
    n_modules = len(h.parts)
    assert counts == [n_modules, n_modules + merged_later, n_modules + merged_later], \
        f"weight changes computed after each call: {counts}, for {n_modules} changed modules ({merged_later} merged)"
    monkeypatch.setattr(hooks, "_weight_key", lambda *a: None)           # the uncached path
    with torch.no_grad():
        h = hooks.WeightHooks(unet, offsets, delta, 0.7).apply()
        uncached = [unet(x, t, ctx) for _ in range(3)]
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))


def test_merged_weights_cost_the_plain_layers(unet):
    """From the second call on, a concept changing every weight costs the FLOPs of the plain U-Net (one product per
    layer, with W'), and gives the two-product result of the first call to rounding."""
    from torch.utils.flop_counter import FlopCounterMode
    hooks = load_hooks()
    unet = _plain_copy(unet)
    offsets, delta = concept(unet)
    x, t, ctx = inputs()

    def flops():
        with FlopCounterMode(display=False) as counter:
            out = unet(x, t, ctx)
        return counter.get_total_flops(), out
    with torch.no_grad():
        plain, _ = flops()
        h = hooks.WeightHooks(unet, offsets, delta, 0.7).apply()
        (first, added), (second, merged_out) = flops(), flops()
        buffers = {layer.cache["value"][0].untyped_storage().data_ptr() for layer in h.layers if layer.plain}
        h.remove()
        expected = merged(unet, offsets, delta, 0.7)(x, t, ctx)
    assert first > 1.5 * plain, f"the first call ({first} FLOPs) did not add layer(x; W' - W) ({plain} plain)"
    assert second == plain, f"hooked U-Net after its first call: {second / plain:.3f}x the plain U-Net's FLOPs"
    assert len(buffers) == 1, f"the layers' W' are kept in {len(buffers)} allocations (want one buffer on a CPU)"
    for got in (added, merged_out):
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        assert err < 1e-5, f"differs from the merged-weight U-Net by {err:.2e} (relative)"


class EditsInPlace(torch.nn.Linear):
    """As the built-in Lora extension's patched forward: writes LoRA into the weight on the first call."""

    def __init__(self, lora):
        super().__init__(lora.shape[1], lora.shape[0])
        self.lora, self.applied = lora, False

    def forward(self, x):
        if not self.applied:
            with torch.no_grad():
                self.weight.add_(self.lora)
            self.applied = True
        return super().forward(x)


class AddsFromInput(torch.nn.Linear):
    """As Lora's "functional" option: LoRA added from the input, weights untouched."""

    def __init__(self, lora):
        super().__init__(lora.shape[1], lora.shape[0])
        self.lora = lora

    def forward(self, x):
        return super().forward(x) + F.linear(x, self.lora)


@pytest.mark.parametrize("kind", [EditsInPlace, AddsFromInput])
def test_the_modules_own_forward_still_counts(kind):
    """Whatever the module's own forward does (edit its weight in place, or add from the input) is in every call's
    output, merged or not."""
    hooks = load_hooks()
    g = torch.Generator().manual_seed(0)
    lora = torch.randn(5, 6, generator=g)
    layer = kind(lora)
    model = torch.nn.ModuleDict({"lin": layer})
    offset, d = torch.randn(5, 6, generator=g) * 0.3, torch.randn(5, 6, generator=g) * 0.1
    x = torch.randn(4, 6, generator=g)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        h = hooks.WeightHooks(model, {"lin.weight": offset}, {"lin.weight": d}, 1.0).apply()
        got = [layer(x) for _ in range(3)]
        _layer = h.layers[0]
        h.remove()
    w = (w0 + lora + d) * (1 + offset) if kind is EditsInPlace else (w0 + d) * (1 + offset)
    want = F.linear(x, w, layer.bias) + (0 if kind is EditsInPlace else F.linear(x, lora))
    for out in got:
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-5), (out - want).abs().max()
    assert _layer.plain is (kind is EditsInPlace), "the module's own forward was misjudged"


def test_forwards_set_by_others_are_kept():
    """An instance-level forward set before E4T's runs inside it and is restored; one set after it keeps working
    once E4T's is removed."""
    hooks = load_hooks()
    lin = torch.nn.Linear(6, 5)
    model = torch.nn.ModuleDict({"lin": lin})
    x, d = torch.randn(2, 6), torch.randn(5, 6)
    calls = []
    theirs = lambda x: calls.append("before") or torch.nn.Linear.forward(lin, x)  # noqa: E731
    lin.forward = theirs
    with torch.no_grad():
        h = hooks.WeightHooks(model, {}, {"lin.weight": d}, 1.0).apply()
        out = lin(x)
        ours = lin.forward
        lin.forward = lambda x: calls.append("after") or ours(x)                 # wraps E4T's
        h.remove()
        again = lin(x)
    assert torch.allclose(out, F.linear(x, lin.weight + d, lin.bias), atol=1e-6)
    assert calls == ["before", "after", "before"], calls
    assert torch.allclose(again, F.linear(x, lin.weight, lin.bias), atol=1e-6), "E4T still applied after removal"


def test_cached_weight_change_follows_in_place_edits():
    """Lora writes weights in place (and restores them): the next call uses the weight as it is now."""
    hooks = load_hooks()
    g = torch.Generator().manual_seed(0)
    lin, norm = torch.nn.Linear(6, 5), torch.nn.LayerNorm(6)
    model = torch.nn.ModuleDict({"lin": lin, "norm": norm})
    offsets = {"lin.weight": torch.randn(5, 6, generator=g) * 0.3}
    delta = {"lin.weight": torch.randn(5, 6, generator=g) * 0.1, "norm.weight": torch.randn(6, generator=g) * 0.1,
             "norm.bias": torch.randn(6, generator=g) * 0.1}
    x = torch.randn(3, 6, generator=g)
    lora = torch.randn(5, 6, generator=g)
    with torch.no_grad():
        h = hooks.WeightHooks(model, offsets, delta, 1.0).apply()
        results = []
        for edit in (None, "apply", "restore"):
            if edit == "apply":
                lin.weight.add_(lora)
                norm.weight.mul_(1.5)
                norm.bias.add_(0.25)
            elif edit == "restore":
                lin.weight.sub_(lora)
                norm.weight.div_(1.5)
                norm.bias.sub_(0.25)
            got = (lin(x), norm(x))
            w = (lin.weight + delta["lin.weight"]) * (1 + offsets["lin.weight"])
            want = (F.linear(x, w, lin.bias), F.layer_norm(x, (6,), norm.weight + delta["norm.weight"],
                                                            norm.bias + delta["norm.bias"]))
            for a, b in zip(got, want):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"after {edit}: {(a - b).abs().max()}"
            results.append(got)
        h.remove()
    assert not torch.equal(results[0][0], results[1][0]), "the in-place edit was not seen"
