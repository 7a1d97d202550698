"""The feature pass shared with the unconditional CFG pass (ComfyUI, tiny models, fp32, CPU).

With an empty negative prompt from the same CLIP, the negative's own U-Net pass sees the latent, timestep
and context of the encoder's feature pass: its down/mid outputs are the encoder's input. Sampling with
them must give what the separate feature pass gives; anywhere else the separate pass runs.
Runs on the 2024 copy (legacy model wrapper) and, with COMFYUI_PATH, on 0.33 (keyed wrapper).
"""
import pytest
import torch

from comfy_harness import CAPTURED
from test_comfyui import graph, host, pack_module  # noqa: F401  (host: the module's fixture)


class Probe:
    """Counts the separate feature passes and records every U-Net run (batch, cond/uncond) and every w."""

    def __init__(self, monkeypatch):
        import comfy.model_base
        refinement = pack_module("e4t.refinement")
        self.feature_passes, self.runs, self.words = 0, [], []
        features, call, apply = refinement.unet_features, refinement.Refinement.__call__, comfy.model_base.BaseModel.apply_model

        def unet_features(*args, **kwargs):
            self.feature_passes += 1
            return features(*args, **kwargs)

        def record(obj, unet, x, t, dtype=None, maps=None):
            out = call(obj, unet, x, t, dtype, maps=maps)
            self.words.append(out.clone())
            return out

        def apply_model(obj, x, t, c_concat=None, c_crossattn=None, *args, **kwargs):
            opts = kwargs.get("transformer_options", args[1] if len(args) > 1 else {})
            self.runs.append((x.shape[0], list(opts.get("cond_or_uncond", []))))
            return apply(obj, x, t, c_concat, c_crossattn, *args, **kwargs)
        monkeypatch.setattr(refinement, "unet_features", unet_features)
        monkeypatch.setattr(refinement.Refinement, "__call__", record)
        monkeypatch.setattr(comfy.model_base.BaseModel, "apply_model", apply_model)


def no_sharing(monkeypatch):
    refine = pack_module("nodes.refine")
    monkeypatch.setattr(refine, "_shared_uncond", lambda *a: None)
    monkeypatch.setattr(refine, "_legacy_shared_uncond", lambda *a: None)


def run(host, g):  # noqa: F811
    """Run g afresh (the executor keeps the last prompt's outputs, and graphs here differ only in a key)."""
    host.executor.reset()
    host.run(g)


def empty_negative(sampler="euler", images=1, **kw):
    g = graph(sampler=sampler, negative="", **kw)
    g["latent"]["inputs"]["batch_size"] = images
    return g


@pytest.mark.parametrize("sampler,images", [("euler", 1), ("ddim", 2), ("heun", 1)])
def test_an_empty_negative_prompt_shares_the_feature_pass(host, monkeypatch, sampler, images):  # noqa: F811
    """Shared: no separate feature pass, the negative's pass (batch = images) then the positive's. The first w
    is bit-identical to the separate feature pass's; later ones and the image differ only by the rounding of
    two half-batch U-Net passes against one batched pass (fp32)."""
    evaluations = 7 if sampler == "heun" else 4                 # heun: two evaluations per step but the last
    with monkeypatch.context() as m:
        separate = Probe(m)
        no_sharing(m)
        run(host, empty_negative(sampler, images, key="separate"))
    shared = Probe(monkeypatch)
    run(host, empty_negative(sampler, images, key="shared"))
    assert separate.feature_passes == evaluations
    assert separate.runs in ([(2 * images, [0, 1])] * evaluations, [(2 * images, [1, 0])] * evaluations), separate.runs
    assert shared.feature_passes == 0
    assert shared.runs == [(images, [1]), (images, [0])] * evaluations, shared.runs
    assert len(shared.words) == len(separate.words) == evaluations
    assert torch.equal(shared.words[0], separate.words[0])      # same latent: the very same maps
    for a, b in zip(shared.words, separate.words):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(shared.words[0], shared.words[-1])
    torch.testing.assert_close(CAPTURED["shared"], CAPTURED["separate"], rtol=1e-5, atol=1e-5)


def test_the_shared_pass_stops_with_the_refinement(host, monkeypatch):  # noqa: F811
    """Below t_stop w is frozen: no pass is split any more (one batched pass per evaluation)."""
    g = empty_negative(key="frozen")
    g["apply"]["inputs"]["t_stop"] = 1000
    probe = Probe(monkeypatch)
    run(host, g)
    assert probe.feature_passes == 0
    assert probe.runs[:2] == [(1, [1]), (1, [0])] and len(probe.runs) == 5
    assert all(n == 2 and sorted(parts) == [0, 1] for n, parts in probe.runs[2:]), probe.runs


@pytest.mark.parametrize("case", ["negative prompt", "cfg 1", "negative with clip skip"])
def test_the_feature_pass_runs_on_its_own_where_sharing_does_not_apply(host, monkeypatch, case):  # noqa: F811
    g = empty_negative(key="fallback")
    if case == "negative prompt":
        g["neg"]["inputs"]["text"] = "blurry"
    elif case == "cfg 1":
        g["ks"]["inputs"]["cfg"] = 1.0
    else:                       # an empty prompt, but not the encoder's empty context
        g["skip"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["ckpt", 1], "stop_at_clip_layer": -2}}
        g["neg"]["inputs"]["clip"] = ["skip", 0]
    probe = Probe(monkeypatch)
    run(host, g)
    assert probe.feature_passes == 4
    assert all(parts != [1] for _, parts in probe.runs), probe.runs
