"""Fetching files over HTTP(S) with a progress bar, hash verification and retries.

Shared by the CIFAR archives and the transfer-learning weights: a download is written to
`<dest>.part` and renamed only once its hash checks out, so a file at `dest` is always whole.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from reslab.errors import ReslabError

_CHUNK = 1 << 20


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: `data_dir`, else $RESLAB_DATA, else ~/.cache/reslab."""
    root = data_dir or os.environ.get("RESLAB_DATA") or Path.home() / ".cache" / "reslab"
    return Path(root).expanduser()


def file_hash(path: str | os.PathLike, algorithm: str = "md5") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_hash(path: Path, *, md5: str | None = None, sha256: str | None = None) -> str | None:
    """None when `path` matches every hash given, else a one-line description of the mismatch."""
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        actual = file_hash(path, algorithm)
        if actual.lower() != expected.lower():
            return f"{algorithm} {actual} != expected {expected}"
    return None


def _fetch(url: str, part: Path, *, quiet: bool, timeout: float) -> None:
    """Stream `url` into `part`; a short read (connection dropped early) is an error here."""
    request = urllib.request.Request(url, headers={"User-Agent": "reslab"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        received = 0
        progress = None
        if not quiet:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TransferSpeedColumn,
            )

            progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                transient=True,
            )
            progress.start()
            task = progress.add_task(f"downloading {Path(part.name).stem}", total=total)
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                if progress is not None:
                    progress.update(task, advance=len(chunk))
        finally:
            if progress is not None:
                progress.stop()
    if total is not None and received != total:
        raise OSError(f"truncated: received {received} of {total} bytes")


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    retries: int = 2,
    quiet: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest` and return `dest`.

    An existing `dest` whose hash matches is reused. A transfer that breaks off, or a file whose
    hash does not match, is reported on stderr, deleted and fetched again, `retries` more times;
    after that a `ReslabError` names the URL and the last failure.
    """
    dest = Path(dest)
    if dest.exists():
        if check_hash(dest, md5=md5, sha256=sha256) is None:
            return dest
        if not quiet:
            print(f"reslab: {dest} is corrupt or incomplete; downloading it again", file=sys.stderr)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    problem = ""
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, quiet=quiet, timeout=timeout)
            problem = check_hash(part, md5=md5, sha256=sha256) or ""
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            problem = str(getattr(err, "reason", None) or err)
        if not problem:
            os.replace(part, dest)
            return dest
        part.unlink(missing_ok=True)
        if attempt < retries:
            if not quiet:
                print(f"reslab: download of {url} failed ({problem}); retrying", file=sys.stderr)
            time.sleep(min(2.0**attempt, 5.0) * 0.1)
    raise ReslabError(
        f"could not download {url} after {retries + 1} attempts ({problem}); "
        f"check the network or place the file at {dest}"
    )

