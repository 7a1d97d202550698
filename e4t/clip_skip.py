"""CLIP skip as a number of text-transformer layers, the one conversion both hosts use."""


def clip_layers(total: int, last: int | None) -> int | None:
    """How many of `total` CLIP layers to run when the prompt stops at layer `last` (None: all).

    `last` counts like a Python index: -1 is the last layer (no skip), -2 stops one before it (ComfyUI's
    CLIP Set Last Layer -2, A1111's "Clip skip" 2); 0, 1, ... count from the first. Both hosts then apply
    the final layer norm to that layer's output (`encode_with_word`), so n == total equals "all"."""
    if last is None:
        return None
    n = total + last + 1 if last < 0 else last + 1
    if not 1 <= n <= total:
        raise ValueError(f"CLIP skip: layer {last} does not exist in a text encoder of {total} layers")
    return n
