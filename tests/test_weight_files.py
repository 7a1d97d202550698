import os
import pickle
import zipfile

import pytest
import torch

import e4t
import e4t.__main__
from e4t.files import E4TFileError, read_pickle
from e4t.offsets import to_published
from tiny_models import write_published


def _all(weights):
    return {**{f"encoder.{k}": v for k, v in weights.encoder.state_dict().items()},
            **{f"offsets.{k}": v for k, v in to_published(weights.offsets).items()}}


def test_published_layout_loads_converts_and_reloads_identically(tmp_path):
    encoder, offsets = write_published(tmp_path / "pub")
    loaded = e4t.load(str(tmp_path / "pub"))
    assert loaded.config.domain_word == "face" and loaded.config.placeholder == "*s" and loaded.config.scale == 0.1
    assert loaded.config.backbone_id == "ViT-H-14/laion2b_s32b_b79k"
    original = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                **{f"offsets.{k}": v for k, v in to_published(offsets).items()}}
    first = _all(loaded)
    assert first.keys() == original.keys()
    for k in original:
        assert torch.equal(first[k], original[k]), k
    out = tmp_path / "face.safetensors"
    assert e4t.__main__.main(["convert", str(tmp_path / "pub"), str(out), "--dtype", "fp32"]) == 0
    again = e4t.load(str(out))
    for k, v in _all(again).items():
        assert torch.equal(v, original[k]), k
    assert again.config.domain_word == "face" and again.config.backbone_included
    half = tmp_path / "half.safetensors"
    e4t.convert(str(tmp_path / "pub"), str(half))                 # fp16 by default
    for k, v in _all(e4t.load(str(half))).items():
        assert v.dtype == torch.float16 and torch.equal(v, original[k].half()), k


def test_unet_pt_variant_and_trimmed_config(tmp_path):
    _, offsets = write_published(tmp_path / "tuned", with_unet=True, config=False)
    with pytest.warns(UserWarning, match="tuned U-Net weights .* are not applied"):
        loaded = e4t.load(str(tmp_path / "tuned"))
    assert loaded.config.domain_word == "face"          # defaults without config.json
    assert not hasattr(loaded, "extra")                 # the tuned U-Net weights are not kept in memory
    for k, v in to_published(loaded.offsets).items():
        assert torch.equal(v, to_published(offsets)[k])


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_would_create_a_file_is_refused_and_nothing_is_created(tmp_path):
    victim = tmp_path / "pwned.txt"
    folder = tmp_path / "evil"
    write_published(folder)
    torch.save({"x": _Evil(str(victim))}, folder / "weight_offsets.pt")
    with pytest.raises(E4TFileError, match="refused"):
        e4t.load(str(folder))
    assert not victim.exists()
    raw = tmp_path / "raw.pt"               # a plain (non-zip) pickle too
    with open(raw, "wb") as f:
        pickle.dump(_Evil(str(victim)), f)
    with pytest.raises(E4TFileError):
        read_pickle(str(raw))
    assert not victim.exists()


def test_wrong_shape_and_unknown_key_name_the_key(tmp_path):
    folder = tmp_path / "pub"
    write_published(folder)
    sd = torch.load(folder / "encoder.pt")
    sd["feature_linear.weight"] = torch.zeros(80, 100)
    torch.save(sd, folder / "encoder.pt")
    with pytest.raises(ValueError, match=r"'feature_linear.weight' has shape \[80, 100\], expected \[80, 160\]"):
        e4t.load(str(folder))
    write_published(folder)
    off = torch.load(folder / "weight_offsets.pt")
    key = next(k for k in off if k.endswith("linear_row.weight"))
    del off[key]
    torch.save(off, folder / "weight_offsets.pt")
    with pytest.raises(KeyError, match="missing linear_row.weight"):
        e4t.load(str(folder))
    off["down_blocks.0.attentions.0.transformer_blocks.0.attn1.wo_x.v"] = torch.ones(1)
    torch.save(off, folder / "weight_offsets.pt")
    with pytest.raises(KeyError, match="wo_x"):
        e4t.load(str(folder))


def test_stock_backbone_must_be_identical(tmp_path):
    encoder, _ = write_published(tmp_path / "pub")
    stock = {f"visual.{k}": v.clone() for k, v in encoder.clip_vision.state_dict().items()}
    stock["visual.proj"] = torch.randn(80, 16)                  # open_clip files carry a projection
    torch.save(stock, tmp_path / "stock.pt")
    out = tmp_path / "slim.safetensors"
    e4t.convert(str(tmp_path / "pub"), str(out), stock_backbone=str(tmp_path / "stock.pt"), dtype="fp32")
    with pytest.raises(E4TFileError, match="carries no ViT backbone"):
        e4t.load(str(out))
    slim = e4t.load(str(out), backbone=stock)
    assert torch.equal(slim.encoder.clip_vision.conv1.weight, encoder.clip_vision.conv1.weight)
    changed = dict(stock)
    changed["visual.transformer.resblocks.1.mlp.c_fc.weight"] = changed["visual.transformer.resblocks.1.mlp.c_fc.weight"] + 1e-3
    torch.save(changed, tmp_path / "other.pt")
    with pytest.raises(E4TFileError, match="transformer.resblocks.1.mlp.c_fc.weight"):
        e4t.convert(str(tmp_path / "pub"), str(tmp_path / "x.safetensors"), stock_backbone=str(tmp_path / "other.pt"))
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(E4TFileError, match="not the backbone"):
        e4t.load(str(out), backbone=changed)


def test_hf_clip_vision_layout_maps_to_open_clip(encoder):
    from e4t.backbone import backbone_state
    oc = encoder.clip_vision.state_dict()
    d = encoder.cfg.vit_width
    hf = {"vision_model.embeddings.patch_embedding.weight": oc["conv1.weight"],
          "vision_model.embeddings.class_embedding": oc["class_embedding"],
          "vision_model.embeddings.position_embedding.weight": oc["positional_embedding"],
          "vision_model.pre_layrnorm.weight": oc["ln_pre.weight"], "vision_model.pre_layrnorm.bias": oc["ln_pre.bias"],
          "vision_model.post_layernorm.weight": oc["ln_post.weight"], "vision_model.post_layernorm.bias": oc["ln_post.bias"]}
    for i in range(encoder.cfg.vit_layers):
        r, h = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for j, x in enumerate("qkv"):
                hf[h + f"self_attn.{x}_proj.{kind}"] = oc[r + f"attn.in_proj_{kind}"][j * d:(j + 1) * d]
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                hf[h + f"{b}.{kind}"] = oc[r + f"{a}.{kind}"]
    mapped = backbone_state(hf)
    assert mapped.keys() == oc.keys()
    assert all(torch.equal(mapped[k], oc[k]) for k in oc)


def test_save_is_atomic(tmp_path, monkeypatch):
    write_published(tmp_path / "pub")
    weights = e4t.load(str(tmp_path / "pub"))
    target = tmp_path / "out.safetensors"
    import safetensors.torch

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        e4t.save(weights, str(target))
    assert not target.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".e4t-")]


def test_folder_walk_survives_a_link_cycle(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.safetensors").write_bytes(b"")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    found = [os.path.join(d, f) for d, _, files in e4t.walk(str(tmp_path)) for f in files]
    assert found == [str(tmp_path / "a" / "x.safetensors")]


def test_concept_image_hash_is_of_the_uint8_pixels():
    import hashlib
    pixels = torch.arange(24, dtype=torch.uint8).view(2, 4, 3)
    assert e4t.pixels_sha256(pixels) == hashlib.sha256(bytes(range(24))).hexdigest()


def test_a_published_text_encoder_is_not_read(tmp_path):
    """`text_encoder.pt` (a tuned CLIP nothing here applies) is named and skipped, not unpickled: garbage loads."""
    write_published(tmp_path / "pub")
    (tmp_path / "pub" / "text_encoder.pt").write_bytes(b"not a pickle")
    with pytest.warns(UserWarning, match="text_encoder.pt is not used"):
        e4t.load(str(tmp_path / "pub"))
