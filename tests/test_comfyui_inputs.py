"""Bad inputs through the ComfyUI nodes (real host code, tiny models, CPU), on the 2024 copy and with
COMFYUI_PATH on 0.33: refused before anything slow with what to do; broken files named; same seed,
same concept; Save Concept never overwrites."""
import os

import pytest
import torch

from comfy_harness import Host
from test_comfyui import graph


@pytest.fixture(scope="module")
def host():
    return Host()


def node(name):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]()


@pytest.fixture
def parts(host):
    model, clip, vae = node("TinyCheckpointLoader").load("tiny")
    e4t_obj = node("E4TLoader").load("tiny-face/")[0]
    image, _ = node("TestImage").make("x")
    return model, clip, vae, e4t_obj, image


def personalize(parts, image=None, mask=None, seed=1, model=None, **settings):
    m, clip, vae, e4t_obj, img = parts
    s = dict(steps=1, batch_size=2, lr=1e-3, reg_lambda=1e-4, seed=seed, trains="all", memory="fast", resolution=64)
    s.update(settings)
    return node("E4TPersonalize").personalize(model or m, clip, vae, e4t_obj, img if image is None else image,
                                              mask=mask, **s)


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model is loaded: refusals must come before anything slow."""
    import comfy.model_management as mm
    loads = []
    original = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: loads.append(a) or original(*a, **k))
    yield loads
    assert not loads, "a model was loaded before the refusal"


def test_bad_images_masks_and_numbers_are_refused_before_loading(parts, no_loading):
    image = parts[4]
    nan_image = image.clone()
    nan_image[0, 1, 1, 0] = float("nan")
    speck = torch.zeros(1, 80, 72)
    speck[:, :5, :5] = 1
    nan_mask = torch.ones(1, 80, 72)
    nan_mask[0, 0, 0] = float("nan")
    cases = [(dict(image=torch.zeros(0, 80, 72, 3)), "batch is empty"), (dict(image=nan_image), "NaN"),
             (dict(image=torch.rand(1, 80, 72, 5)), "5 channels"), (dict(image=image * 255), "divide by 255"),
             (dict(image=torch.rand(1, 8, 8, 3)), "at least 16"),
             (dict(mask=torch.zeros(1, 80, 72)), "mask editor"), (dict(mask=speck), "less than 1 %"),
             (dict(mask=nan_mask), "NaN"), (dict(mask=torch.ones(1, 80, 160)), "image's shape"),
             (dict(lr=float("nan")), "learning rate is nan"), (dict(reg_lambda=float("inf")), "λ"),
             (dict(seed=-1), "seed"), (dict(resolution=96), "multiple of 64")]
    for kwargs, wanted in cases:
        with pytest.raises(ValueError, match=wanted):
            personalize(parts, **kwargs)


def test_grey_and_rgba_images_tune_as_their_rgb(parts):
    """A 1-channel IMAGE is the grey picture in RGB; RGBA drops its alpha: same concept as the RGB tensor."""
    grey = parts[4][..., :1]
    a = personalize(parts, image=grey)[1]
    b = personalize(parts, image=grey.expand(-1, -1, -1, 3).contiguous())[1]
    rgba = torch.cat([parts[4], torch.rand(1, 80, 72, 1)], dim=-1)
    c, d = personalize(parts, image=rgba)[1], personalize(parts, image=parts[4])[1]
    for x, y in ((a, b), (c, d)):
        assert all(torch.equal(x.weights.unet_delta[k], y.weights.unet_delta[k]) for k in x.weights.unet_delta)


def test_same_seed_same_concept_whatever_ran_before(parts):
    """The host's VAE encode may sample from torch's global state (the 2024 copy does): the node's seed governs it."""
    torch.manual_seed(11)
    a = personalize(parts, seed=5)[1].weights.unet_delta
    torch.manual_seed(999)
    torch.randn(100)
    b = personalize(parts, seed=5)[1].weights.unet_delta
    c = personalize(parts, seed=6)[1].weights.unet_delta
    assert all(torch.equal(a[k], b[k]) for k in a), "the same seed gave another concept"
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_other_model_families_and_widths_are_refused_before_loading(parts, no_loading):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    from e4t_standalone.comfy_models import TINY_UNET
    from tiny_models import tiny_model
    with torch.inference_mode():
        cfg = comfy.supported_models.SD20(dict(TINY_UNET))
        cfg.unet_config.update(num_heads=2, num_head_channels=-1)
        sd2 = comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(cfg, comfy.model_base.ModelType.V_PREDICTION),
                                               load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="SD20 model; E4T works with Stable Diffusion 1.x"):
        personalize(parts, model=sd2)
    narrow = tiny_model(unet_config={**TINY_UNET, "channel_mult": [1, 1]})
    with pytest.raises(ValueError, match="U-Net feature channels.*SD15 MODEL"):
        personalize(parts, model=narrow)
    m, clip, _, e4t_obj, image = parts
    with pytest.raises(ValueError, match="SD20 model"):
        node("E4TApply").apply(sd2, clip, e4t_obj, 1.0, 0, image)
    with pytest.raises(ValueError, match="U-Net feature channels"):
        node("E4TApply").apply(narrow, clip, e4t_obj, 1.0, 0, image)
    for strength in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="strength"):
            node("E4TApply").apply(m, clip, e4t_obj, strength, 0, image)
    with pytest.raises(ValueError, match="placeholder is ''"):
        node("E4TTextEncode").encode(clip, "a photo of *s", "")


def test_broken_weight_files_are_named_with_what_to_do(host):
    good = open(os.path.join(host.models, "tiny-face", "encoder.pt"), "rb").read()
    os.makedirs(os.path.join(host.models, "broken-face"), exist_ok=True)
    files = {"empty.safetensors": b"", "cut.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", "lfs.safetensors":
             b"version https://git-lfs.github.com/spec/v1\n", "broken-face/encoder.pt": good[:len(good) // 3]}
    for name, content in files.items():
        with open(os.path.join(host.models, name), "wb") as f:
            f.write(content)
    for name, wanted in (("empty.safetensors", "is empty"), ("cut.safetensors", "cut short"),
                         ("lfs.safetensors", "Git LFS pointer"), ("broken-face/", "encoder.pt is cut short")):
        with pytest.raises(ValueError, match=wanted) as err:
            node("E4TLoader").load(name)
        assert os.path.join(host.models, name.rstrip("/")) in str(err.value)
        assert "again" in str(err.value) or "fetch" in str(err.value)


def test_save_concept_twice_with_one_prefix_keeps_both(host):
    for seed in (1, 2):                                # two concepts, one prefix: two files
        g = graph(tune={"steps": 1, "seed": seed}, key=f"saved_{seed}")
        g["save"] = {"class_type": "E4TSaveConcept", "inputs": {"e4t": ["tune", 1], "filename_prefix": "twice/me"}}
        host.run(g)
    folder = os.path.join(host.models, "concepts", "twice")
    assert sorted(os.listdir(folder)) == ["me_00001_.safetensors", "me_00002_.safetensors"]
