"""Evaluation as in the paper's fig. 4: prompt adherence vs identity, per generated image.

prompt similarity: CLIP cosine of the image and its prompt with the placeholder removed (or replaced by
the domain word); identity: mean CLIP image cosine to the concept image(s), or, with a user-supplied
face-recognition TorchScript model, the mean cosine of its embeddings. No weights are downloaded: the
CLIP model is an open_clip architecture (by name or JSON config) with weights from a local file.
"""
import csv
import json
import os

import torch
import torch.nn.functional as F

from .files import E4TFileError, read_tensors
from .encoder import CLIP_MEAN, CLIP_STD
from .images import pil_to_tensor, save_png

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def load_clip(config: str, weights: str):
    """(model, tokenize) from an open_clip model name (e.g. ViT-H-14) or a JSON config, and a local weights file."""
    import open_clip

    if os.path.isfile(config):
        with open(config) as f:
            cfg = json.load(f)
        model, tokenize = open_clip.CLIP(**cfg), open_clip.tokenize
    else:
        model, tokenize = open_clip.create_model(config, pretrained=None), open_clip.get_tokenizer(config)
    model.load_state_dict(read_tensors(weights))
    return model.eval(), tokenize


def clip_pixels(images, size: int) -> torch.Tensor:
    """Shortest side to `size` (bicubic), centre crop, CLIP mean/std: (n, 3, size, size)."""
    out = []
    for x in images:
        h, w = x.shape[-2:]
        s = size / min(h, w)
        x = F.interpolate(x[None], size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                          align_corners=False, antialias=True)[0]
        top, left = (x.shape[1] - size) // 2, (x.shape[2] - size) // 2
        out.append(x[:, top:top + size, left:left + size].clamp(0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def prompt_of(image) -> str | None:
    """The prompt stored by the host: A1111 'parameters' or a ComfyUI graph with an E4T Text Encode node."""
    info = getattr(image, "info", {}) or {}
    if "parameters" in info:
        return info["parameters"].split("\nNegative prompt:")[0].strip()
    if "prompt" in info:
        graph = json.loads(info["prompt"])
        texts = [n["inputs"].get("text") for n in graph.values() if n.get("class_type") == "E4TTextEncode"]
        texts = [t for t in texts if isinstance(t, str)]
        if texts:
            return texts[0]
    return None


@torch.no_grad()
def evaluate(images: dict, prompts: dict, concepts: list, clip, tokenize, placeholder: str = "*s",
             domain_word: str = "", face_model=None) -> list:
    """images: {name: (3, h, w) in [0, 1]}; prompts: {name: text}; concepts: [(3, h, w)] -> rows of scores."""
    size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, (tuple, list)) else clip.visual.image_size
    names = sorted(images)
    emb = F.normalize(clip.encode_image(clip_pixels([images[n] for n in names], size)), dim=-1)
    ref = F.normalize(clip.encode_image(clip_pixels(concepts, size)), dim=-1)
    texts = [" ".join(prompts[n].replace(placeholder, domain_word).split()) for n in names]
    txt = F.normalize(clip.encode_text(tokenize(texts)), dim=-1)
    identity = (emb @ ref.T).mean(1)
    if face_model is not None:
        faces = lambda xs: F.normalize(face_model(torch.stack([F.interpolate(x[None], size=(112, 112), mode="bilinear",
                                                                               antialias=True)[0] for x in xs]) * 2 - 1), dim=-1)
        identity = (faces([images[n] for n in names]) @ faces(concepts).T).mean(1)
    return [{"image": n, "prompt": t, "prompt_similarity": float(p), "identity_similarity": float(i)}
            for n, t, p, i in zip(names, texts, (emb * txt).sum(-1), identity)]


def run(folder: str, concept_paths: list, clip_config: str, clip_weights: str, out_csv: str, out_plot: str,
        prompts_csv: str | None = None, placeholder: str = "*s", domain_word: str = "", face_model: str | None = None):
    from PIL import Image

    from .plots import scatter_plot

    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise E4TFileError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) to evaluate")
    given = {}
    if prompts_csv:
        with open(prompts_csv, newline="") as f:
            given = {row["image"]: row["prompt"] for row in csv.DictReader(f)}
    images, prompts = {}, {}
    for name in files:
        with Image.open(os.path.join(folder, name)) as im:
            images[name] = pil_to_tensor(im)
            prompts[name] = given.get(name) or prompt_of(im)
        if not prompts[name]:
            raise E4TFileError(f"{name}: no prompt: give --prompts CSV (columns image,prompt) or images saved by "
                               f"ComfyUI/A1111 with their metadata")
    concepts = []
    for path in concept_paths:
        with Image.open(path) as im:
            concepts.append(pil_to_tensor(im))
    clip, tokenize = load_clip(clip_config, clip_weights)
    face = torch.jit.load(face_model, map_location="cpu").eval() if face_model else None
    rows = evaluate(images, prompts, concepts, clip, tokenize, placeholder, domain_word, face)
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot = scatter_plot([r["identity_similarity"] for r in rows], [r["prompt_similarity"] for r in rows],
                        "E4T evaluation (paper fig. 4)", "identity similarity", "prompt similarity")
    save_png(plot, out_plot)
    return rows
