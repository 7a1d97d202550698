"""The E4T folder (`--e4t-dir`, default `<webui models>/e4t`): E4T weights to tune from, concepts to sample with.

A name is the path below the folder without `.safetensors` (`faces/anna`). A file holding
`concept.tokens` is a personalised concept; any other E4T file, or a published folder with
`encoder.pt`, is E4T weights to tune from. File kinds are read from headers and cached by mtime.
"""
import os

import e4t
from e4t import read_header

from .host import E4TError

CONCEPT, WEIGHTS = "concept", "weights"
_kinds = {}                      # (path, mtime) -> kind or None
_loaded = {}                     # (path, mtime) -> E4TWeights: the last E4T weights tuned from
_reasons = {}                    # path -> why it is not an E4T file (a broken file's own message)


def folder() -> str:
    from modules import paths_internal, shared
    return getattr(shared.cmd_opts, "e4t_dir", None) or os.path.join(paths_internal.models_path, "e4t")


def mtime(path):
    return os.path.getmtime(os.path.join(path, "encoder.pt") if os.path.isdir(path) else path)


def kind(path: str):
    """CONCEPT, WEIGHTS, or None for a file that is not ours (read from the header only)."""
    key = (path, mtime(path))
    if key not in _kinds:
        if os.path.isdir(path):
            _kinds[key] = WEIGHTS
        else:
            from safetensors import safe_open
            try:
                read_header(path)
                with safe_open(path, framework="pt") as f:
                    keys = set(f.keys())
                _kinds[key] = CONCEPT if "concept.tokens" in keys else WEIGHTS
            except Exception as err:
                _kinds[key] = None
                _reasons[path] = str(err)
    return _kinds[key]


def entries() -> dict:
    """{name: path} of every E4T file or published folder below the folder, sorted by name."""
    root, found = folder(), {}
    if not os.path.isdir(root):
        return found
    for dirpath, dirnames, filenames in e4t.walk(root):
        dirnames.sort()
        if "encoder.pt" in filenames and dirpath != root:
            found[os.path.relpath(dirpath, root).replace(os.sep, "/")] = dirpath
            dirnames.clear()
            continue
        for fn in sorted(filenames):
            if fn.endswith(".safetensors") and not fn.startswith("."):
                path = os.path.join(dirpath, fn)
                found[os.path.relpath(path, root)[: -len(".safetensors")].replace(os.sep, "/")] = path
    return dict(sorted(found.items()))


def names(wanted: str) -> list:
    return [name for name, path in entries().items() if kind(path) == wanted]


def path_of(name: str, wanted: str) -> str:
    if not name:
        raise E4TError(f"no E4T {wanted} chosen")
    path = entries().get(name)
    if path is None:
        raise E4TError(f"no E4T {wanted} named {name!r} in {folder()} (press the refresh button, or check "
                       f"--e4t-dir)")
    if kind(path) != wanted:
        other = {CONCEPT: "E4T weights, not a personalised concept: tune it in the E4T tab first",
                 WEIGHTS: "a personalised concept, not E4T weights to tune from"}[wanted]
        raise E4TError(f"{name!r} is {other}" if kind(path) else _reasons.get(path, f"{path} is not an E4T file"))
    return path


def load(path: str, keep: bool = True) -> e4t.E4TWeights:
    """e4t.load; with `keep`, the last file loaded stays in RAM for the next tune."""
    key = (path, mtime(path))
    try:
        weights = _loaded.get(key) or e4t.load(path)
    except e4t.PickleRefused as err:        # the webui's safe-unpickle check said why only on the console
        from .host import safe_unpickle_reason
        raise E4TError(f"{err}. The webui's safe-unpickle check refused {err.path}: "
                       f"{safe_unpickle_reason(err.path)}") from None
    _loaded.clear()
    if keep:
        _loaded[key] = weights
    return weights


def source_path(name: str) -> str | None:
    """Where the E4T weights a concept names are (for `e4t.load`), or None."""
    path = entries().get(name)
    return path if path is not None and kind(path) == WEIGHTS else None


def file_hash(path: str, name: str) -> str:
    """sha256 of the file through the webui's hash cache (computed once per file version)."""
    from modules import hashes
    if os.path.isdir(path):
        return hashes.sha256(os.path.join(path, "encoder.pt"), f"e4t/{name}") or ""
    return hashes.sha256(path, f"e4t/{name}") or ""


def find(name: str, short_hash: str = None) -> str:
    """The local concept for an infotext's name and hash: the name if it exists, else a file whose
    cached hash starts with `short_hash`; `name` unchanged when nothing matches."""
    from modules import hashes
    local = entries()
    if name in local and kind(local[name]) == CONCEPT:
        return name
    if short_hash:
        for other, path in local.items():
            cached = hashes.sha256_from_cache(path, f"e4t/{other}") if not os.path.isdir(path) else None
            if cached and cached.startswith(short_hash) and kind(path) == CONCEPT:
                return other
    return name
