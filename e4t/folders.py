"""Searching a folder tree (E4T files in a host's folder, a domain's images) without looping on links."""
import os


def walk(root: str):
    """os.walk following links, each real folder once (a link back up the tree would loop forever)."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        yield dirpath, dirnames, filenames
