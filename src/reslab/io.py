"""Files that are either whole or absent, and the one cache folder: every file reslab writes goes
through here.

A write goes to a temporary file in the same folder, is flushed to disk, and is then renamed over
the target (rename is atomic on POSIX), so a crash or kill -9 at any moment leaves the previous
version intact: never half a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# The cache (downloads, decoded image folders, exports, the models table). RESLAB_DATA was the
# name of the data half of it before there was one cache; it is still honoured.
CACHE_ENV = "RESLAB_CACHE"
OLD_CACHE_ENV = "RESLAB_DATA"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: `override` (e.g. --data-dir), else $RESLAB_CACHE, else $RESLAB_DATA, else
    ~/.cache/reslab. Every cached thing lives below it."""
    root = override or os.environ.get(CACHE_ENV) or os.environ.get(OLD_CACHE_ENV) or Path.home() / ".cache" / "reslab"
    return Path(root).expanduser()


def _default_mode() -> int:
    """The permissions a plain open() would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # Set after the writer is done: mkstemp makes the file owner-only (0600), and some writers
        # (safetensors' save_file) replace the file they are given by one of their own, also 0600.
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, header, rows) -> Path:
    """A whole CSV file (header, then rows; None as an empty cell, floats to 6 significant digits)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return write_text(path, buf.getvalue())
