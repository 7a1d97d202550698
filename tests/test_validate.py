"""Bad inputs and broken files get one clear message (engine level; the hosts' own tests run them through nodes/tabs)."""
import math
import os
import time

import pytest
import torch

import e4t
from e4t import validate
from e4t.atomic import STALE_SECONDS, remove_stale_temporaries
from e4t.files import E4TFileError, PickleRefused, read_pickle, read_tensors
from tiny_models import tiny_encoder_config, write_published


# --- files ----------------------------------------------------------------------------------------

@pytest.fixture
def ours(tmp_path):
    """One of our files, converted from a tiny published folder."""
    write_published(str(tmp_path / "pub"))
    out = str(tmp_path / "w.safetensors")
    e4t.convert(str(tmp_path / "pub"), out)
    return out


def broken_copies(path, tmp_path):
    data = open(path, "rb").read()
    ext = os.path.splitext(path)[1]
    cases = {"empty": b"", "cut": data[: len(data) // 2], "header cut": data[:20], "garbage": os.urandom(4096),
             "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
             "html": b"<!DOCTYPE html><html><body>Not found</body></html>"}
    out = {}
    for name, content in cases.items():
        p = tmp_path / f"{name.replace(' ', '_')}{ext}"
        p.write_bytes(content)
        out[name] = str(p)
    return out


WANTED = {"empty": "is empty (0 bytes)", "cut": "cut short", "header cut": "", "garbage": "",
          "lfs": "Git LFS pointer", "html": "web page"}


def test_every_broken_safetensors_names_the_file_and_what_to_do(ours, tmp_path):
    for name, path in broken_copies(ours, tmp_path).items():
        with pytest.raises(E4TFileError) as err:
            e4t.load(path)
        message = str(err.value)
        assert path in message and WANTED[name] in message, (name, message)
        assert any(w in message for w in ("again", "fetch the file")), (name, message)
        with pytest.raises(E4TFileError, match="again|fetch"):
            read_tensors(path)                       # the reader evaluate and pretrain use


def test_every_broken_pickle_of_a_published_folder_names_the_file(tmp_path):
    pub = tmp_path / "pub"
    write_published(str(pub))
    good = open(pub / "encoder.pt", "rb").read()
    for name, content in {"empty": b"", "cut": good[: len(good) // 2], "garbage": os.urandom(300),
                          "lfs": b"version https://git-lfs.github.com/spec/v1\n", "html": b"<html></html>"}.items():
        (pub / "encoder.pt").write_bytes(content)
        with pytest.raises(E4TFileError) as err:
            e4t.load(str(pub))
        message = str(err.value)
        assert str(pub / "encoder.pt") in message and WANTED[name] in message, (name, message)
        assert "again" in message or "fetch" in message, (name, message)
    (pub / "encoder.pt").write_bytes(good)
    (pub / "config.json").write_text("{not json")
    with pytest.raises(E4TFileError, match=r"config.json is not valid JSON.*download it again"):
        e4t.load(str(pub))


def test_a_host_that_refuses_a_pickle_is_reported_as_such(tmp_path, monkeypatch):
    """A1111's safe-unpickle check makes torch.load return None: PickleRefused, with the file, never NoneType."""
    torch.save({"a": torch.zeros(2)}, tmp_path / "x.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)
    with pytest.raises(PickleRefused, match="refused this file.*python -m e4t convert") as err:
        read_pickle(str(tmp_path / "x.pt"))
    assert err.value.path == str(tmp_path / "x.pt")


def test_a_training_state_is_read_whole_and_a_state_dict_only_of_tensors(tmp_path):
    torch.save({"step": 3, "heads": {"w": torch.ones(1)}}, tmp_path / "state.pt")
    assert read_pickle(str(tmp_path / "state.pt"), state_dict=False)["step"] == 3
    with pytest.raises(E4TFileError, match="expected a state dict"):
        read_pickle(str(tmp_path / "state.pt"))
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(read_tensors(str(tmp_path / "ok.pt"))["a"], torch.ones(2))


def test_non_finite_weights_are_refused_by_convert_and_load(tmp_path, ours):
    pub = tmp_path / "nan"
    write_published(str(pub))
    enc = torch.load(pub / "encoder.pt")
    key = next(k for k in enc if k.startswith("clip_vision.") and k.endswith("weight"))
    enc[key][0, 0] = float("nan")
    torch.save(enc, pub / "encoder.pt")
    with pytest.raises(validate.NonFiniteError, match=key.replace(".", r"\.")):
        e4t.convert(str(pub), str(tmp_path / "nan.safetensors"))
    assert not os.path.exists(tmp_path / "nan.safetensors")
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(ours, "pt") as f:
        meta = f.metadata()
    sd = load_file(ours)
    key = next(k for k in sd if k.startswith("offsets."))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("inf")
    save_file(sd, str(tmp_path / "inf.safetensors"), metadata=meta)
    with pytest.raises(validate.NonFiniteError, match="NaN or infinite.*make it again"):
        e4t.load(str(tmp_path / "inf.safetensors"))


def test_stale_temporaries_of_killed_writes_are_removed_and_running_ones_kept(tmp_path, ours):
    old, fresh = tmp_path / ".e4t-old.tmp", tmp_path / ".e4t-running.tmp"
    for p in (old, fresh):
        p.write_bytes(b"half a file")
    past = time.time() - STALE_SECONDS - 10
    os.utime(old, (past, past))
    e4t.save(e4t.load(ours), str(tmp_path / "again.safetensors"))
    assert not old.exists() and fresh.exists()
    remove_stale_temporaries(str(tmp_path / "no-such-folder"))


# --- images, masks, numbers -----------------------------------------------------------------------

def test_images_grey_and_rgba_become_rgb_and_non_images_are_refused():
    rgb = torch.rand(1, 40, 32, 3)
    assert torch.equal(validate.image(rgb), rgb[0])
    grey = torch.rand(2, 40, 32, 1)
    assert torch.equal(validate.image(grey), grey[0].expand(40, 32, 3))
    rgba = torch.rand(1, 40, 32, 4)
    assert torch.equal(validate.image(rgba), rgba[0, ..., :3])
    grey_alpha = torch.rand(40, 32, 2)
    assert torch.equal(validate.image(grey_alpha), grey_alpha[..., :1].expand(40, 32, 3))
    nan = rgb.clone()
    nan[0, 3, 3, 1] = float("nan")
    for bad, wanted in ((torch.rand(0, 40, 32, 3), "batch is empty"), (torch.rand(40, 32), "mask"),
                        (torch.rand(1, 3, 40, 32), "channels first"), (torch.rand(1, 40, 32, 5), "5 channels"),
                        (torch.rand(1, 8, 8, 3), "at least 16"), (nan, "NaN"), (rgb * 255, "divide by 255"),
                        (torch.rand(1, 1, 40, 32, 3), "shape"), ("image.png", "not an image")):
        with pytest.raises(validate.InputError, match=wanted):
            validate.image(bad)
    over = rgb.clone()
    over[0, 0, 0, 0] = 1 + 1e-4
    assert validate.image(over).max() == 1.0                           # rounding clamped, not refused


def test_masks_one_empty_rule_and_shapes():
    full = torch.ones(1, 40, 32)
    assert validate.mask(None, (40, 32), "paint it") is None
    assert validate.mask(full, (80, 64), "paint it").shape == (80, 64)          # same aspect: resized
    speck = torch.zeros(40, 32)
    speck[:3, :3] = 1                                                            # 0.7 %: empty by the one rule
    nan = full.clone()
    nan[0, 0, 0] = float("nan")
    for bad, wanted in ((torch.zeros(40, 32), "covers 0.00 %"), (speck, "less than 1 %"), (nan, "NaN"),
                        (full * 255, "divide by 255"), (torch.ones(0, 40, 32), "batch is empty"),
                        (torch.ones(40, 80), "must have the image's shape"), (torch.ones(1, 1, 40, 32), "shape")):
        with pytest.raises(validate.InputError, match=wanted) as err:
            validate.mask(bad, (40, 32), "paint it")
        assert "paint it" in str(err.value) or wanted in ("shape", "divide by 255", "must have the image's shape")
    ring = torch.zeros(40, 32)
    ring[:5, :] = 1                                                             # 12.5 %: fine
    assert validate.mask(ring, (40, 32), "paint it").mean() > 0.1


@pytest.mark.parametrize("field,value,wanted", [
    ("lr", float("nan"), "learning rate is nan"), ("lr", -1e-5, "learning rate is -1e-05"),
    ("reg_lambda", float("inf"), "λ.*inf"), ("steps", 0, "steps is 0"), ("batch_size", 2.5, "whole number"),
    ("seed", -1, "seed is -1"), ("seed", 2**64, "seed"), ("resolution", 100, "multiple of 64"),
    ("accumulation", 3, "not a multiple"),
    ("lr", None, "learning rate is None"), ("steps", True, "steps is True")])
def test_tune_settings_are_checked(field, value, wanted):
    from dataclasses import replace
    cfg = e4t.TuneConfig(batch_size=4)
    validate.tune_config(cfg)
    with pytest.raises(validate.InputError, match=wanted):
        validate.tune_config(replace(cfg, **{field: value}))


def test_numbers_and_placeholder():
    assert validate.number("strength", 1, 0, 2) == 1.0 and validate.number("t", 3.0, integer=True) == 3
    for bad in (float("nan"), float("inf"), -0.5, 2.5, "1", None):
        with pytest.raises(validate.InputError, match="strength"):
            validate.number("strength", bad, 0, 2)
    assert validate.placeholder(" *s ") == "*s"
    for bad in ("", "   ", None):
        with pytest.raises(validate.InputError, match="placeholder"):
            validate.placeholder(bad)


def test_model_family_and_fit():
    with pytest.raises(validate.InputError, match="v2-1.safetensors is a SD 2.x model.*1.x"):
        validate.sd1_model("v2-1.safetensors", "SD 2.x", False, 4)
    with pytest.raises(validate.InputError, match="9 latent channels"):
        validate.sd1_model("inpaint", "SD15", True, 9)
    cfg = tiny_encoder_config()
    shapes = {"a.attn2.to_k.weight": (32, 32)}
    validate.e4t_fits("w", cfg.word_dim, cfg.unet_dim, shapes, "m", cfg.word_dim, cfg.unet_dim, shapes)
    for args, wanted in (((cfg.word_dim + 1, cfg.unet_dim, shapes), "width"),
                         ((cfg.word_dim, cfg.unet_dim * 2, shapes), "feature channels"),
                         ((cfg.word_dim, cfg.unet_dim, {"b.weight": (1, 1)}), "does not have"),
                         ((cfg.word_dim, cfg.unet_dim, {"a.attn2.to_k.weight": (64, 32)}), r"as \[64, 32\]")):
        with pytest.raises(validate.InputError, match=wanted):
            validate.e4t_fits("w", *args, "m", cfg.word_dim, cfg.unet_dim, shapes)


# --- determinism and non-finite values in use -----------------------------------------------------

def test_seeded_host_steps_draw_from_the_seed_and_leave_the_global_state():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with e4t.seeded(7):
        a = torch.randn(3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.randn(5)                                                     # whatever ran before
    with e4t.seeded(7):
        b = torch.randn(3)
    with e4t.seeded(8):
        c = torch.randn(3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_refinement_stops_on_a_non_finite_embedding(unet, encoder):
    folded = encoder.fold(encoder.image_features(torch.rand(1, 3, 32, 32) * 2 - 1))
    d = encoder.cfg.word_dim
    ref = e4t.Refinement(folded, torch.zeros(d), torch.zeros(1, 77, d), 0.1)
    x = torch.randn(1, 4, 8, 8)
    w = ref(unet, x, torch.tensor([500.0]))
    assert torch.isfinite(w).all() and len(ref.history) == 1
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(validate.NonFiniteError, match="timestep 400.*latent already was.*Nothing was changed"):
        ref(unet, x, torch.tensor([400.0]))
    assert ref.last is None and len(ref.history) == 1 and math.isfinite(ref.history[0][1])
