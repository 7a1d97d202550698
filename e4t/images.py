"""PIL images <-> tensors: the one conversion of the engine and the command line (hosts hand in their own types)."""
import torch


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] (any shape) -> uint8 on the CPU: clamped, scaled by 255 and rounded, the one rule for
    what a concept file stores and `pixels_sha256` hashes, whichever host made the pixels."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def pil_pixels(image) -> torch.Tensor:
    """PIL image -> (h, w, 3) uint8 RGB pixels (what a concept file stores and `pixels_sha256` hashes)."""
    rgb = image.convert("RGB")
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)


def pil_to_tensor(image) -> torch.Tensor:
    """PIL image -> (3, h, w) float in [0, 1]."""
    return pil_pixels(image).permute(2, 0, 1).float() / 255


def save_png(image: torch.Tensor, path: str, text: dict | None = None) -> None:
    """(h, w, 3) in [0, 1] -> PNG, with `text` in its metadata (e.g. the prompt under `parameters`, as A1111
    writes it and `e4t eval` reads it)."""
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    Image.fromarray(to_uint8(image).numpy()).save(path, pnginfo=info)
