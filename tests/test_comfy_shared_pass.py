"""The feature pass shared with the unconditional CFG pass (ComfyUI, tiny models, fp32, CPU).

With an empty negative prompt from the same CLIP, the negative's own U-Net pass sees the latent, timestep
and context of the encoder's feature pass: its down/mid outputs are the feature pass's maps. The host's
batched call then computes the down/mid blocks for the other rows only, and must give what the whole call
gives; anywhere else the call stays whole.
Runs on the 2024 copy (legacy model wrapper) and, with COMFYUI_PATH, on 0.33 (keyed wrapper).
"""
import pytest
import torch

from comfy_harness import CAPTURED, TinyCheckpointLoader
from test_comfyui import graph, host, pack_module  # noqa: F401  (host: the module's fixture)


class Probe:
    """Records the batch each U-Net path runs (the first layer of the down path, of the up path: after E4T's
    narrowing), every apply-model call (batch, cond/uncond) and every w."""

    def __init__(self, monkeypatch):
        import comfy.model_base
        refinement = pack_module("e4t.refinement")
        self.down, self.up, self.runs, self.words = [], [], [], []
        call, apply = refinement.Refinement.__call__, comfy.model_base.BaseModel.apply_model
        unet = TinyCheckpointLoader().load("tiny")[0].model.diffusion_model
        self.handles = [layer.register_forward_hook(lambda m, a, o, seen=seen: seen.append(a[0].shape[0]))
                        for layer, seen in ((unet.input_blocks[0][0], self.down), (unet.output_blocks[0][0], self.up))]

        def record(obj, unet, x, t, dtype=None, maps=None):
            out = call(obj, unet, x, t, dtype, maps=maps)
            self.words.append(out.clone())
            return out

        def apply_model(obj, x, t, c_concat=None, c_crossattn=None, *args, **kwargs):
            opts = kwargs.get("transformer_options", args[1] if len(args) > 1 else {})
            self.runs.append((x.shape[0], list(opts.get("cond_or_uncond", []))))
            return apply(obj, x, t, c_concat, c_crossattn, *args, **kwargs)
        monkeypatch.setattr(refinement.Refinement, "__call__", record)
        monkeypatch.setattr(comfy.model_base.BaseModel, "apply_model", apply_model)

    def remove(self):
        for handle in self.handles:
            handle.remove()


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


def probed(host, monkeypatch, g):  # noqa: F811
    probe = Probe(monkeypatch)
    try:
        run(host, g)
    finally:
        probe.remove()
    return probe


@pytest.mark.parametrize("sampler,images", [("euler", 1), ("ddim", 2), ("heun", 1)])
def test_an_empty_negative_prompt_shares_the_feature_pass(host, monkeypatch, sampler, images):  # noqa: F811
    """Shared: per evaluation the feature pass (batch = images), then one batched call whose down path runs the
    positive's rows only and whose up path runs all. w is the same feature pass's in both; the images differ
    only by the rounding of the down path run at half the batch (fp32)."""
    evaluations = 7 if sampler == "heun" else 4                 # heun: two evaluations per step but the last
    with monkeypatch.context() as m:
        no_sharing(m)
        separate = probed(host, m, empty_negative(sampler, images, key="separate"))
    shared = probed(host, monkeypatch, empty_negative(sampler, images, key="shared"))
    assert separate.down == [images, 2 * images] * evaluations, separate.down
    assert shared.down == [images, images] * evaluations, shared.down
    assert shared.up == separate.up == [2 * images] * evaluations
    for probe in (separate, shared):
        assert probe.runs in ([(2 * images, [0, 1])] * evaluations, [(2 * images, [1, 0])] * evaluations), probe.runs
    assert len(shared.words) == len(separate.words) == evaluations
    assert torch.equal(shared.words[0], separate.words[0])      # same latent: the very same maps
    for a, b in zip(shared.words, separate.words):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(shared.words[0], shared.words[-1])
    torch.testing.assert_close(CAPTURED["shared"], CAPTURED["separate"], rtol=1e-5, atol=1e-5)


def test_the_shared_pass_stops_with_the_refinement(host, monkeypatch):  # noqa: F811
    """Below t_stop w is frozen: no feature pass, and the calls stay whole."""
    g = empty_negative(key="frozen")
    g["apply"]["inputs"]["t_stop"] = 1000
    probe = probed(host, monkeypatch, g)
    assert probe.down == [1, 1] + [2] * 3, probe.down       # the first evaluation predicts w, then it is frozen
    assert len(probe.runs) == 4


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
    probe = probed(host, monkeypatch, g)
    per_call = 1 if case == "cfg 1" else 2
    assert probe.down == [1, per_call] * 4, probe.down
