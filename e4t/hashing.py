"""The content hashes E4T records in its files, the same in every host: of tensors and of image pixels."""
import hashlib

import torch


def tensors_sha256(state: dict) -> str:
    """A hash of tensors by name, shape and fp16 value (the precision E4T files and hosts keep a backbone
    in): equal hashes prove the weights equal at that precision."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float16).contiguous()
        h.update(f"{key}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def pixels_sha256(pixels: torch.Tensor) -> str:
    """The concept-image hash both hosts record in a concept file: of its (h, w, 3) uint8 pixels."""
    return hashlib.sha256(pixels.to("cpu", torch.uint8).contiguous().numpy().tobytes()).hexdigest()
