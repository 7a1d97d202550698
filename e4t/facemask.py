"""Automatic concept masks for the face-masked loss (paper §3.4), from OpenCV's Haar cascades.

OpenCV's wheel (`opencv-python-headless<5`, Apache-2.0; cascades under the permissive Intel licence)
ships the detectors itself: nothing is downloaded, nothing is compiled. It is optional: without it the
caller gets a clear message and can give a mask by hand.
"""
import torch

CASCADES = {"face": "haarcascade_frontalface_default.xml", "cat": "haarcascade_frontalcatface_extended.xml"}


class MaskUnavailable(RuntimeError):
    """No detector installed, or nothing found: the message says what to do."""


def detect_mask(image: torch.Tensor, kind: str = "face", grow: float = 1.6) -> torch.Tensor:
    """image (h, w, 3) in [0, 1] -> (h, w) mask in {0, 1}: an ellipse around the largest detection,
    `grow` times its size so hair and chin are kept."""
    try:
        import cv2
        path = cv2.data.haarcascades + CASCADES[kind]
    except (ImportError, AttributeError):
        raise MaskUnavailable("automatic masks need OpenCV with its Haar cascades: pip install "
                              "'opencv-python-headless<5' (5.x ships none), or give a mask by hand") from None
    except KeyError:
        raise ValueError(f"no detector for {kind!r}: choose one of {', '.join(CASCADES)}") from None
    gray = (image[..., :3].float().mean(-1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    h, w = gray.shape
    found = cv2.CascadeClassifier(path).detectMultiScale(gray, scaleFactor=1.1, minNeighbors=3,
                                                         minSize=(max(16, min(h, w) // 10),) * 2)
    if len(found) == 0:
        raise MaskUnavailable(f"no {kind} found in the concept image: use a clearer, frontal picture, or give a "
                              f"mask by hand")
    x, y, bw, bh = max(found, key=lambda box: box[2] * box[3])
    cy, cx = y + bh / 2, x + bw / 2
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    inside = ((yy - cy) / (grow * bh / 2)) ** 2 + ((xx - cx) / (grow * bw / 2)) ** 2 <= 1
    return inside.float()
