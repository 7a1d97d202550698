"""The `e4t` model folder: ComfyUI's `models/e4t` (and extra_model_paths entries) plus this pack's `models/e4t`."""
import os

import folder_paths

from ..e4t import walk

PACK_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "e4t")


def register():
    paths, exts = folder_paths.folder_names_and_paths.get("e4t", ([], set()))
    paths = list(paths) or [os.path.join(folder_paths.models_dir, "e4t")]
    if PACK_MODELS not in paths:
        paths.append(PACK_MODELS)
    folder_paths.folder_names_and_paths["e4t"] = (paths, set(exts) | {".safetensors"})


def choices() -> list:
    """Our .safetensors files, and published folders (holding encoder.pt) as `name/`."""
    found = set(f for f in folder_paths.get_filename_list("e4t") if f.endswith(".safetensors"))
    for root in folder_paths.get_folder_paths("e4t"):
        for dirpath, _, files in walk(root):
            if "encoder.pt" in files and dirpath != root:
                found.add(os.path.relpath(dirpath, root).replace(os.sep, "/") + "/")
    return sorted(found)


def full_path(name: str) -> str:
    for root in folder_paths.get_folder_paths("e4t"):
        path = os.path.join(root, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"E4T weights {name!r} not found in {folder_paths.get_folder_paths('e4t')}")


def save_dir() -> str:
    return folder_paths.get_folder_paths("e4t")[0]


def source_path(name: str) -> str | None:
    """Where the E4T weights a concept names (`e4t.concept.source_name`) are: a file or a published folder."""
    for candidate in (name + ".safetensors", name):
        for root in folder_paths.get_folder_paths("e4t"):
            path = os.path.join(root, candidate)
            if os.path.isfile(path) or os.path.isfile(os.path.join(path, "encoder.pt")):
                return path
    return None
