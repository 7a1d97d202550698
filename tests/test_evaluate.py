import csv
import json

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import e4t.__main__
from e4t.evaluate import clip_pixels, evaluate, load_clip
from e4t.images import pil_to_tensor

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_clip_files(tmp_path):
    import open_clip
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "clip.safetensors")
    return str(tmp_path / "clip.json"), str(tmp_path / "clip.safetensors")


def image(seed, size=(40, 48)):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


def test_known_values_on_constructed_inputs(tmp_path):
    config, weights = tiny_clip_files(tmp_path)
    model, tokenize = load_clip(config, weights)
    concept = pil_to_tensor(image(1))
    images = {"same.png": concept, "other.png": pil_to_tensor(image(2))}
    rows = {r["image"]: r for r in evaluate(images, {"same.png": "a photo of *s", "other.png": "*s on the moon"},
                                            [concept], model, tokenize, domain_word="face")}
    assert abs(rows["same.png"]["identity_similarity"] - 1.0) < 1e-5          # an image is itself
    assert rows["other.png"]["identity_similarity"] < 0.9999
    assert rows["same.png"]["prompt"] == "a photo of face" and rows["other.png"]["prompt"] == "face on the moon"
    with torch.no_grad():   # independent computation of one prompt similarity
        a = F.normalize(model.encode_image(clip_pixels([images["other.png"]], 32)), dim=-1)
        b = F.normalize(model.encode_text(tokenize(["face on the moon"])), dim=-1)
    assert abs(rows["other.png"]["prompt_similarity"] - float((a * b).sum())) < 1e-5


def test_cli_writes_csv_and_plot_and_reads_host_metadata(tmp_path):
    config, weights = tiny_clip_files(tmp_path)
    gen = tmp_path / "gen"
    gen.mkdir()
    from PIL.PngImagePlugin import PngInfo
    a1111 = PngInfo()
    a1111.add_text("parameters", "a photo of *s smiling\nNegative prompt: blurry\nSteps: 20")
    image(3).save(gen / "a.png", pnginfo=a1111)
    comfy = PngInfo()
    comfy.add_text("prompt", json.dumps({"5": {"class_type": "E4TTextEncode", "inputs": {"text": "*s in paris"}}}))
    image(4).save(gen / "b.png", pnginfo=comfy)
    image(1).save(tmp_path / "concept.png")
    out, plot = tmp_path / "r.csv", tmp_path / "r.png"
    assert e4t.__main__.main(["eval", str(gen), "--concept", str(tmp_path / "concept.png"), "--clip", config,
                              "--clip-weights", weights, "--out", str(out), "--plot", str(plot)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["prompt"] for r in rows] == ["a photo of smiling", "in paris"]
    assert Image.open(plot).size == (512, 400)


def test_cli_refuses_images_without_prompts(tmp_path, capsys):
    config, weights = tiny_clip_files(tmp_path)
    (tmp_path / "gen").mkdir()
    image(5).save(tmp_path / "gen" / "x.png")
    image(1).save(tmp_path / "c.png")
    assert e4t.__main__.main(["eval", str(tmp_path / "gen"), "--concept", str(tmp_path / "c.png"), "--clip", config,
                              "--clip-weights", weights]) == 2
    assert "no prompt" in capsys.readouterr().err
