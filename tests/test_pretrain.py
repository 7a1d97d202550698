"""`python -m e4t pretrain --tiny`: the loop from scratch, checkpoints, an exact resume, clear errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import e4t
import e4t.__main__


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("domain")
    (root / "nested").mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.png", "nested/b.jpg", "nested/c.webp", "d.PNG"]):
        Image.fromarray((rng.random((72 + 8 * i, 64, 3)) * 255).astype("uint8")).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return str(root)


def run(data, out, steps, *extra):
    return e4t.__main__.main(["pretrain", "--tiny", "--data", data, "--domain-word", "cat", "--out", str(out),
                              "--steps", str(steps), "--batch", "2", "--save-every", "2", "--sample-every", "100",
                              "--sample-steps", "2", *extra])


def tensors(path):
    w = e4t.load(str(path))
    return {**{f"e.{k}": v for k, v in w.encoder.state_dict().items() if not k.startswith("clip_vision.")},
            **{f"o.{k}": v for k, v in w.offsets.state_dict().items()}}


def test_from_scratch_writes_reloadable_checkpoints_logs_and_samples(data, tmp_path):
    assert run(data, tmp_path, 4, "--sample-every", "4") == 0
    files = sorted(os.listdir(tmp_path))
    assert files == ["e4t-000002.safetensors", "e4t-000004.safetensors", "loss.csv", "samples", "state.pt"]
    assert os.listdir(tmp_path / "samples") == ["step-000004.png"]
    first, last = tensors(tmp_path / "e4t-000002.safetensors"), tensors(tmp_path / "e4t-000004.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)              # it trains
    loaded = e4t.load(str(tmp_path / "e4t-000004.safetensors"))
    assert loaded.config.domain_word == "cat"
    assert all(float(d.abs().max()) < 0.1 for d in loaded.offsets.deltas().values())   # near identity start
    assert (tmp_path / "loss.csv").read_text().startswith("step,loss\n")


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    assert run(data, tmp_path / "straight", 4) == 0
    assert run(data, tmp_path / "split", 2) == 0
    assert run(data, tmp_path / "split", 4, "--resume", str(tmp_path / "split" / "state.pt")) == 0
    a = tensors(tmp_path / "straight" / "e4t-000004.safetensors")
    b = tensors(tmp_path / "split" / "e4t-000004.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_identity_and_published_initialisation(data, tmp_path):
    """With a zero learning rate the first checkpoint holds the initialisation: ΔW = 0 exactly by default;
    with --published-init every parameter as nn.Linear initialises it (ΔW about ±20 %, as published).
    The encoder is the same either way."""
    assert run(data, tmp_path / "identity", 1, "--base-lr", "0") == 0
    assert run(data, tmp_path / "pub", 1, "--published-init", "--base-lr", "0") == 0
    identity, pub = (e4t.load(str(tmp_path / d / "e4t-000001.safetensors")) for d in ("identity", "pub"))
    assert identity.offsets.targets == pub.offsets.targets and len(pub.offsets.targets) > 1
    assert all(float(d.abs().max()) == 0 for d in identity.offsets.deltas().values())
    assert min(float(d.std()) for d in pub.offsets.deltas().values()) > 0.05
    for t in pub.offsets.targets:
        offset = pub.offsets[t]
        assert float(offset.v) == 1.0
        for linear in (offset.linear1, offset.linear2, offset.linear_column, offset.linear_row):
            bound = linear.in_features ** -0.5                           # nn.Linear's uniform range
            for p in (linear.weight, linear.bias):
                assert float(p.abs().max()) <= bound * 1.001, t          # fp16 storage rounds up a little
        row = offset.linear_row.weight
        assert float(row.abs().max()) > 0.8 * offset.linear_row.in_features ** -0.5, t   # not the identity's zeros
    enc = {k: v for k, v in identity.encoder.state_dict().items() if not k.startswith("clip_vision.")}
    assert all(torch.equal(v, pub.encoder.state_dict()[k]) for k, v in enc.items())


def test_a_folder_without_images_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    assert run(str(tmp_path / "empty"), tmp_path / "out", 2) == 2
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_two_processes_with_torchrun(data, tmp_path):
    """Multi-process data parallel through torchrun (gloo on the CPU): gradients are averaged, rank 0 writes."""
    import shutil
    import subprocess
    import sys
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    out = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "e4t", "pretrain", "--tiny", "--device", "cpu",
                          "--data", data, "--domain-word", "cat", "--out", str(tmp_path), "--steps", "2", "--batch",
                          "2", "--save-every", "2", "--sample-every", "100", "--sample-steps", "2"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("wrote checkpoints") == 1                    # rank 0 only
    assert e4t.load(str(tmp_path / "e4t-000002.safetensors")).config.domain_word == "cat"


def test_tiny_run_leaves_no_temporary_folder_and_a_broken_resume_file_is_named(data, tmp_path, monkeypatch, capsys):
    import tempfile
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))          # this run's temporaries only
    assert run(data, tmp_path / "out", 2) == 0
    assert not [f for f in os.listdir(scratch) if f.startswith("e4t-")], os.listdir(scratch)
    state = tmp_path / "out" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert run(data, tmp_path / "out", 4, "--resume", str(state)) == 2
    err = capsys.readouterr().err
    assert str(state) in err and "cut short" in err and "without --resume" in err
