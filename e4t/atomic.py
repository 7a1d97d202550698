"""Files written whole or not at all: readers see the old file or the new one, never half a file."""
import glob
import os
import tempfile
import time

STALE_SECONDS = 24 * 3600      # no write of ours takes a day: an older temporary was left by a killed process


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write):
    """write(tmp) into a temporary file beside `path`, flushed to disk, then renamed over `path`. The file
    gets the permissions of any newly created file (0666 less the umask), not the temporary file's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(prefix=".e4t-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: str) -> None:
    """Delete `.e4t-*.tmp` files a killed write left in `folder` (only those untouched for a day, so a
    write still running in another process keeps its file)."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), ".e4t-*.tmp")):
        try:
            if time.time() - os.path.getmtime(tmp) > STALE_SECONDS:
                os.unlink(tmp)
        except OSError:             # removed meanwhile, or not ours to remove
            pass
