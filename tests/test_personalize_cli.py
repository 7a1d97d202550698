"""`python -m e4t personalize --tiny`: one image -> a concept file that loads and images, on a fresh machine;
the launcher that runs the command line from any folder."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import e4t
import e4t.__main__
from tiny_models import write_published

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def face(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "face.png"
    Image.fromarray((np.random.default_rng(0).random((80, 64, 3)) * 255).astype("uint8")).save(path)
    return str(path)


def personalize(face, out, *extra):
    return e4t.__main__.main(["personalize", "--tiny", "--image", face, "--out", str(out), "--steps", "2",
                              "--batch", "2", "--sample-steps", "3", *extra])


def test_tiny_run_writes_a_concept_that_loads_and_its_images(face, tmp_path, capsys):
    assert personalize(face, tmp_path, "--prompt", "a portrait of *s", "--prompt", "a dog") == 0
    err = capsys.readouterr().err
    assert "tune step 2/2" in err and "lacks the placeholder '*s'" in err
    assert sorted(os.listdir(tmp_path)) == ["01.png", "02.png", "concept.safetensors", "loss.png", "tiny-e4t.safetensors"]
    concept = e4t.load(str(tmp_path / "concept.safetensors"),
                       find_source=lambda name: str(tmp_path / f"{name}.safetensors"))
    record = concept.config.concept
    assert record["host"] == "cli" and record["tune"]["steps"] == 2 and len(record["losses"]) == 2
    assert record["image_sha256"] == e4t.pixels_sha256(torch.from_numpy(np.array(Image.open(face))))
    assert concept.concept_tokens is not None and concept.unet_delta
    assert any(float(d.abs().max()) > 0 for d in concept.unet_delta.values())          # it tuned
    with Image.open(tmp_path / "01.png") as im:
        assert im.size == (64, 64)
        assert im.info["parameters"].splitlines()[0] == "a portrait of *s"
        pixels = np.asarray(im)
    assert np.isfinite(pixels).all() and pixels.std() > 0


def test_published_weights_and_a_mask(face, tmp_path):
    write_published(str(tmp_path / "pub"))
    mask = tmp_path / "mask.png"
    m = np.zeros((80, 64), dtype="uint8")
    m[20:60, 16:48] = 255
    Image.fromarray(m).save(mask)
    assert personalize(face, tmp_path / "out", "--e4t", str(tmp_path / "pub"), "--mask", str(mask)) == 0
    concept = e4t.load(str(tmp_path / "out" / "concept.safetensors"), find_source=lambda name: str(tmp_path / name))
    assert concept.config.concept["mask"] == "uploaded" and concept.config.concept["source"] == "pub"
    assert concept.config.domain_word == "face" and concept.config.placeholder == "*s"


def test_bad_inputs_are_refused_before_any_model_loads(face, tmp_path, capsys):
    assert e4t.__main__.main(["personalize", "--image", face, "--out", str(tmp_path)]) == 2
    assert "give --ckpt" in capsys.readouterr().err
    assert personalize(str(tmp_path / "missing.png"), tmp_path) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("not an image")
    assert personalize(str(tmp_path / "notes.png"), tmp_path) == 2
    assert "not a readable image" in capsys.readouterr().err
    black = np.zeros((80, 64), dtype="uint8")
    black[0, :8] = 255                                      # 0.16 % white: empty by the hosts' rule
    Image.fromarray(black).save(tmp_path / "black.png")
    assert personalize(face, tmp_path, "--mask", str(tmp_path / "black.png")) == 2
    assert "covers 0.16 % of the image" in capsys.readouterr().err
    Image.fromarray(np.full((64, 64), 255, dtype="uint8")).save(tmp_path / "square.png")
    assert personalize(face, tmp_path, "--mask", str(tmp_path / "square.png")) == 2
    assert "must have the image's shape" in capsys.readouterr().err
    assert not (tmp_path / "concept.safetensors").exists()


def test_applied_adds_the_tuned_delta_before_the_offsets(unet):
    torch.manual_seed(0)
    offsets = e4t.Offsets(e4t.targets(unet.state_dict()), identity=False)
    deltas = {k: d.detach() for k, d in offsets.deltas().items()}
    key = next(iter(deltas))
    added = {key: torch.randn_like(unet.state_dict()[key]), "out.2.bias": torch.ones(4)}
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with e4t.applied(unet, deltas, 0.5, added=added):
        now = unet.state_dict()
        assert torch.allclose(now[key], (before[key] + 0.5 * added[key]) * (1 + 0.5 * deltas[key]))
        assert torch.equal(now["out.2.bias"], before["out.2.bias"] + 0.5)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_launcher_runs_the_command_line_from_another_folder(tmp_path):
    """From ComfyUI's root `python -m e4t` finds no module; `python .../e4t_cli.py` works anywhere."""
    write_published(str(tmp_path / "pub"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "e4t_cli.py"), "convert", "pub", "e4t-face.safetensors"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert e4t.load(str(tmp_path / "e4t-face.safetensors")).config.domain_word == "face"
    plain = subprocess.run([sys.executable, "-m", "e4t", "convert", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode != 0 and "No module named e4t" in plain.stderr     # why the launcher exists


def test_memory_mode_picks_the_fastest_mode_that_fits():
    """The one rule the node, the A1111 tab and the command line use (e4t.memory_mode), from the estimated peaks."""
    fast, lean = e4t.tune_peak("fast"), e4t.tune_peak("low_vram")
    assert lean < fast / 2
    assert e4t.memory_mode("auto", "cpu", 80 * 2**30) == "fast"
    assert e4t.memory_mode("auto", "cuda:0", int(fast * 1.2)) == "fast"
    assert e4t.memory_mode("auto", "cuda:0", int(fast * 1.05)) == "low_vram"          # 10 % headroom
    assert e4t.memory_mode("auto", "cuda:0", 24 * 2**30) == "low_vram"
    assert e4t.memory_mode("low_vram", "cpu") == "low_vram" and e4t.memory_mode("fast", "cuda:0") == "fast"
    assert e4t.tune_peak("low_vram", "all", 4, 512) < lean and e4t.tune_peak("low_vram", "attention") < lean
    with pytest.raises(e4t.validate.InputError, match="needs about .* GiB.*has 2.0 GiB.*Lower batch_size"):
        e4t.memory_mode("auto", "cuda:0", 2 * 2**30)
    four, eight = (e4t.tune_peak("low_vram", "all", b, 512) for b in (4, 8))
    assert four < eight
    small = int((four + eight) / 2 * 1.1)                                 # batch 4 fits with headroom, 8 does not
    with pytest.raises(e4t.validate.InputError, match="Try batch_size 4"):
        e4t.memory_mode("auto", "cuda:0", small)