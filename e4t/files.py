"""Reading tensor files: one reader for `.safetensors` and `torch.save` pickles, for every caller.

A broken file gets one message that names it, says what is wrong (empty, cut short, a Git LFS pointer
or a web page saved under the weights' name, not the format its name says, a pickle that references
code) and what to do; the checks read a few bytes before any tensor is touched. Pickles are read with
`torch.load(weights_only=True)`, which cannot run code; a host may refuse them earlier (A1111's
safe-unpickle check returns None): that is `PickleRefused`, so the host can add its own reason.
"""
import json
import os
import pickle
import zipfile

import torch

REDOWNLOAD = "download or copy it again"
MAX_HEADER = 100_000_000                 # safetensors' own limit on its JSON header


class E4TFileError(ValueError):
    """A weight file that cannot be used; the message says what was expected and what to do."""


class PickleRefused(E4TFileError):
    """The host's own pickle check refused the file (A1111's safe unpickler returned None)."""

    def __init__(self, message, path):
        super().__init__(message)
        self.path = path


def _start(path: str, fix: str) -> bytes:
    """The first bytes of an existing, non-empty file; a clear error for a missing, empty or stand-in file."""
    if not os.path.isfile(path):
        raise E4TFileError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise E4TFileError(f"{path} is empty (0 bytes): the download or copy did not finish; {fix}")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise E4TFileError(f"{path} is a Git LFS pointer ({size} bytes), not the weights: fetch the file itself "
                           f"(`git lfs pull`, or the download link of the file)")
    if head.lstrip()[:1] == b"<":
        raise E4TFileError(f"{path} is a web page ({size} bytes), not weights: the download saved an error or "
                           f"login page; {fix}")
    return head


def safetensors_header(path: str, fix: str = REDOWNLOAD) -> dict:
    """The JSON header of a `.safetensors` file, after checking that the file is as long as it says."""
    head = _start(path, fix)
    size = os.path.getsize(path)
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) < 8 or n > MAX_HEADER or head[8:9] != b"{":
        raise E4TFileError(f"{path} is not a .safetensors file (it starts with {head[:12]!r}); {fix}")
    if 8 + n > size:
        raise E4TFileError(f"{path} is cut short: {size} bytes, its header alone needs {8 + n}; {fix}")
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise E4TFileError(f"{path}: damaged .safetensors header ({err}); {fix}") from None
    if 8 + n + end > size:
        raise E4TFileError(f"{path} is cut short: {size} of {8 + n + end} bytes; {fix}")
    return header


def safetensors_metadata(path: str, fix: str = REDOWNLOAD) -> dict:
    """The `__metadata__` strings of a `.safetensors` file, without reading tensors."""
    return safetensors_header(path, fix).get("__metadata__") or {}


def read_safetensors(path: str, fix: str = REDOWNLOAD) -> dict:
    """All tensors of a checked `.safetensors` file (memory-mapped)."""
    from safetensors.torch import load_file

    safetensors_header(path, fix)
    try:
        return load_file(path)
    except Exception as err:                                   # safetensors raises its own SafetensorError
        raise E4TFileError(f"{path}: unreadable .safetensors ({str(err).splitlines()[0]}); {fix}") from None


def read_pickle(path: str, fix: str = REDOWNLOAD, state_dict: bool = True):
    """A `torch.save`d state dict read without executing anything: only tensors and plain containers
    (`state_dict=False`: any such structure, e.g. a training state)."""
    head = _start(path, fix)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError):
            raise E4TFileError(f"{path} is cut short or damaged (its zip index is missing, "
                               f"{os.path.getsize(path)} bytes); {fix}") from None
    elif not head.startswith(b"\x80"):
        raise E4TFileError(f"{path} is not a PyTorch file (it starts with {head[:12]!r}); {fix}")
    try:
        data = _torch_load(path)
    except pickle.UnpicklingError as err:
        raise E4TFileError(f"{path}: refused to load: the pickle references code or objects other than "
                           f"tensors ({str(err).splitlines()[0]}). Only plain state dicts are accepted; "
                           f"convert trusted files with `python -m e4t convert`.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise E4TFileError(f"{path} is cut short or damaged ({str(err).splitlines()[0]}); {fix}") from None
    if data is None:
        raise PickleRefused(f"{path}: the host's pickle check refused this file; convert the folder once with "
                            f"`python -m e4t convert` and use the .safetensors file", path)
    plain = isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())
    if state_dict and not plain:
        raise E4TFileError(f"{path}: expected a state dict (names -> tensors), found {type(data).__name__}; "
                           f"is this the right file?")
    return data


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):                             # legacy (pre-zip) files cannot be memory-mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_tensors(path: str, fix: str = REDOWNLOAD) -> dict:
    """A state dict from a `.safetensors` file, or from a `torch.save` pickle (any other name)."""
    path = os.fspath(path)
    return read_safetensors(path, fix) if path.endswith(".safetensors") else read_pickle(path, fix)


def read_json(path: str, fix: str = REDOWNLOAD) -> dict:
    """A JSON object file, with the file named when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise E4TFileError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise E4TFileError(f"{path}: expected a JSON object, found {type(data).__name__}; {fix}")
    return data
