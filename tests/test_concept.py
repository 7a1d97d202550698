"""Concept files: one schema, compressed deltas against the source E4T weights, old files still load."""
import copy
import json
import os
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import e4t
from e4t.concept import Compression, upgrade_metadata
from e4t.offsets import to_published


def _source(unet, encoder):
    torch.manual_seed(0)
    offsets = e4t.Offsets(e4t.targets(unet.state_dict()), identity=False).requires_grad_(False)
    with torch.no_grad():          # as a host holds weights read from an fp16 file
        for p in list(offsets.parameters()) + encoder.heads():
            p.copy_(p.half().float())
    return e4t.E4TWeights(config=e4t.DomainConfig(encoder=asdict(encoder.cfg)), encoder=encoder, offsets=offsets)


def _tuned(source, unet, rank=2):
    """A tune's result whose deltas are exactly of rank `rank` (so a rank-`rank` file keeps them), plus vectors."""
    g = torch.Generator().manual_seed(1)

    def low_rank(p):
        if p.dim() < 2:
            return torch.randn(p.shape, generator=g) * 1e-4
        m = p.reshape(p.shape[0], -1)
        return (torch.randn(m.shape[0], rank, generator=g) @ torch.randn(rank, m.shape[1], generator=g) * 1e-4
                ).reshape(p.shape)
    enc = copy.deepcopy(source.encoder)
    offs = copy.deepcopy(source.offsets)
    with torch.no_grad():
        for p in enc.heads() + list(offs.parameters()):
            p.add_(low_rank(p))
    return e4t.TuneResult(encoder=enc, offsets=offs, unet_delta={n: low_rank(p) for n, p in unet.named_parameters()},
                          losses=[0.5, 0.25])


def _concept(source, result, host="comfyui", compression=Compression(rank=2, unet_rank=2, whole_below=0)):
    meta = e4t.concept_metadata(host=host, source="faces/e4t.safetensors", source_sha256=e4t.source_sha256(source),
                                image_sha256="abc", base_fingerprint="f00", tune=e4t.TuneConfig(steps=2),
                                losses=result.losses, mask="face", compression=compression)
    return e4t.make_concept(source, result, tokens=torch.randn(1, 9, 80), image=torch.zeros(6, 4, 3, dtype=torch.uint8),
                            metadata=meta)


def _state(weights):
    heads = {f"encoder.{k}": v for k, v in weights.encoder.state_dict().items() if not k.startswith("clip_vision.")}
    return {**heads, **{f"offsets.{k}": v for k, v in to_published(weights.offsets).items()},
            **{f"unet.{k}": v for k, v in weights.unet_delta.items()}, "tokens": weights.concept_tokens}


@pytest.fixture
def folder(tmp_path, unet, encoder):
    """An E4T folder with the source weights at faces/e4t.safetensors."""
    source = _source(unet, encoder)
    os.makedirs(tmp_path / "faces")
    e4t.save(source, str(tmp_path / "faces" / "e4t.safetensors"))
    return tmp_path, source


def find_in(root):
    return lambda name: str(root / (name + ".safetensors")) if (root / (name + ".safetensors")).exists() else None


def test_a_saved_concept_reloads_exactly_as_the_host_applied_it(folder, unet):
    root, source = folder
    result = _tuned(source, unet)
    concept = _concept(source, result)
    path = str(root / "concept.safetensors")
    e4t.save(concept, path)
    loaded = e4t.load(path, find_source=find_in(root))
    ours, theirs = _state(concept), _state(loaded)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k].float(), theirs[k].float()), k
    assert loaded.config.concept == concept.config.concept and loaded.config.concept["source"] == "faces/e4t"
    with safe_open(path, framework="pt") as f:       # matrices as factors: the file stores the deltas' SVD
        keys = set(f.keys())
    assert any(k.startswith("lowrank.unet.") for k in keys) and any(k.startswith("lowrank.encoder.") for k in keys)
    # rank-2 deltas are kept to the precision of fp16 factors; the tune's changes are all there
    tuned = {**{f"encoder.{k}": v for k, v in result.encoder.state_dict().items() if not k.startswith("clip_vision.")},
             **{f"offsets.{k}": v for k, v in to_published(result.offsets).items()},
             **{f"unet.{k}": v for k, v in result.unet_delta.items()}}
    src = _state(source)
    for k, v in tuned.items():
        change = v - src.get(k, 0)
        assert (theirs[k].float() - v).norm() <= 2e-3 * change.norm() + 1e-7, k
    # and the same again after a second save: the file's tensors are written as read
    e4t.save(loaded, str(root / "again.safetensors"))
    again = _state(e4t.load(str(root / "again.safetensors"), find_source=find_in(root)))
    assert all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_a_concept_without_its_source_or_with_another_says_which_file(folder, unet, encoder):
    root, source = folder
    path = str(root / "concept.safetensors")
    e4t.save(_concept(source, _tuned(source, unet)), path)
    with pytest.raises(e4t.E4TFileError, match="'faces/e4t'.*not found: put that file in the E4T folder"):
        e4t.load(path, find_source=lambda name: None)
    with pytest.raises(e4t.E4TFileError, match="not found"):
        e4t.load(path)
    other = copy.deepcopy(source)
    with torch.no_grad():
        other.encoder.final_linear.bias.add_(1)
    other.heads_sha256 = ""
    e4t.save(other, str(root / "faces" / "e4t.safetensors"))
    with pytest.raises(e4t.E4TFileError, match="tuned from E4T weights 'faces/e4t' .* but .* has"):
        e4t.load(path, find_source=find_in(root))


def test_both_hosts_write_one_schema(folder, unet):
    root, source = folder
    result = _tuned(source, unet)
    a, b = _concept(source, result, "comfyui").config.concept, _concept(source, result, "a1111").config.concept
    assert a.keys() == b.keys() and {k for k in a if a[k] != b[k]} == {"host"}
    assert a["schema"] == 2 and a["tune"]["steps"] == 2 and a["tune"]["reg_lambda"] == e4t.TuneConfig().reg_lambda
    assert _concept(source, result).config.reg_lambda == source.config.reg_lambda    # the domain's, not the tune's


V1_COMFYUI = {"image_sha256": "abc", "base_fingerprint": "f00", "source": "e4t.safetensors", "losses": [0.5],
              "steps": 2, "batch_size": 4, "lr": 1e-3, "reg_lambda": 0.1, "trains": "all"}
V1_A1111 = {"image_sha256": "abc", "base_fingerprint": "f00", "base_model": "sd15", "source": "e4t", "masked": True,
            "mask": "uploaded", "host": "a1111", "tune": {"steps": 2, "batch_size": 4, "lr": 1e-3, "reg_lambda": 0.1,
                                                          "trains": "all", "templates": ["a photo of {}"]},
            "losses": [0.5]}


def _write_format_1(path, source, result, concept):
    """A concept as format 1 (this project until concept schema 2) wrote it: heads, offsets and U-Net delta
    whole in fp16 under `encoder.`, `offsets.`, `unet_delta.`, flat JSON metadata under `e4t`."""
    cfg = {**asdict(source.config), "backbone_included": False, "backbone_sha256": "b" * 64, "concept": concept}
    tensors = {f"encoder.{k}": v for k, v in result.encoder.state_dict().items() if not k.startswith("clip_vision.")}
    tensors.update({f"offsets.{k}": v for k, v in to_published(result.offsets).items()})
    tensors.update({f"unet_delta.{k}": v for k, v in result.unet_delta.items()})
    tensors = {k: v.detach().half().contiguous() for k, v in tensors.items()}
    tensors["concept.tokens"] = torch.randn(1, 9, 80).half()
    tensors["concept.image"] = torch.zeros(6, 4, 3, dtype=torch.uint8)
    save_file(tensors, path, metadata={"e4t": json.dumps({"format_version": 1, "architecture": "e4t-v1", **cfg})})
    return tensors


@pytest.mark.parametrize("old", [V1_COMFYUI, V1_A1111], ids=["comfyui", "a1111"])
def test_format_1_concepts_load_in_the_current_schema_and_resave(folder, unet, old):
    root, source = folder
    result = _tuned(source, unet)
    path = str(root / "old.safetensors")
    written = _write_format_1(path, source, result, old)
    loaded = e4t.load(path)                            # no source needed: format 1 kept heads and offsets whole
    meta = loaded.config.concept
    assert meta.keys() == _concept(source, result).config.concept.keys()
    assert meta["tune"]["steps"] == 2 and meta["tune"]["reg_lambda"] == 0.1 and meta["losses"] == [0.5]
    assert meta["mask"] == ("uploaded" if old is V1_A1111 else None) and meta["source_sha256"] == ""
    state = _state(loaded)
    for k, v in written.items():
        key = k.replace("unet_delta.", "unet.").replace("concept.tokens", "tokens")
        if key in state:
            assert torch.equal(state[key].half(), v), k
    e4t.save(loaded, str(root / "new.safetensors"))   # re-saved as format 2, heads and offsets whole
    new = e4t.load(str(root / "new.safetensors"))
    assert new.config.concept["tune"] == meta["tune"] and e4t.read_header(str(root / "new.safetensors"))["format_version"] == 2
    for k in state:
        if not k.startswith("unet."):
            assert torch.equal(_state(new)[k].float(), state[k].float()), k


def test_upgrade_keeps_a_current_schema_as_it_is():
    meta = {"schema": 2, "host": "a1111", "mask": None}
    assert upgrade_metadata(meta) is meta


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_usual_permissions_and_are_written_atomically(folder, unet, umask):
    root, source = folder
    old = os.umask(umask)
    try:
        e4t.save(source, str(root / "weights.safetensors"))
        e4t.save(_concept(source, _tuned(source, unet)), str(root / "concept.safetensors"))
    finally:
        os.umask(old)
    for name in ("weights.safetensors", "concept.safetensors"):
        assert os.stat(root / name).st_mode & 0o777 == 0o666 & ~umask, name
    assert not [f for f in os.listdir(root) if f.startswith(".e4t-")]


def test_a_newer_concept_format_is_refused_with_what_to_do(folder):
    root, source = folder
    path = str(root / "future.safetensors")
    save_file({"x": torch.zeros(1)}, path, metadata={"e4t": json.dumps({"format_version": 3, "architecture": "e4t-v1"})})
    with pytest.raises(e4t.E4TFileError, match="update the extension"):
        e4t.load(path)


def test_another_base_model_is_named_in_the_warning(folder, unet):
    root, source = folder
    concept = _concept(source, _tuned(source, unet))
    concept.config.concept["base_model"] = "v1-5-pruned"
    assert e4t.check_base(concept.config, "f00") is None
    assert "(v1-5-pruned), fingerprint f00; this one is 123" in e4t.check_base(concept.config, "123")


def test_u_net_and_heads_keep_their_own_ranks(folder, unet):
    """`rank` bounds the directions of heads and offsets, `unet_rank` those of the U-Net delta (which needs more)."""
    root, source = folder
    concept = _concept(source, _tuned(source, unet), compression=Compression(rank=1, unet_rank=2, whole_below=0))
    path = str(root / "ranks.safetensors")
    e4t.save(concept, path)
    with safe_open(path, framework="pt") as f:
        ranks = [(k.split(".")[1], f.get_slice(k).get_shape()[0]) for k in f.keys() if k.endswith(".s")]
    assert {r for g, r in ranks if g == "unet"} == {2} and {r for g, r in ranks if g != "unet"} == {1}
