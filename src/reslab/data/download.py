"""Fetching files over HTTP(S) with a progress bar, hash verification and retries.

Shared by the CIFAR archives and the transfer-learning weights. A download goes to a temporary file
beside `dest` (reslab.io.atomic_path) and is renamed to `dest` only once every hash given checks
out, so a file at `dest` is always whole and right: a bad download is never there to be reused.
Downloads restart from zero rather than resume (so no `.part` file is kept between runs): a kept
partial file is one more thing that can go stale or be taken for whole, and these files (data
archives, weights) are small enough to fetch again.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from reslab.errors import ReslabError
from reslab.io import atomic_path

_CHUNK = 1 << 20
# A sha256 may be given as a prefix of its hex digest, as torch.hub's file names carry one.
_HEX = {"md5": re.compile(r"[0-9a-fA-F]{32}"), "sha256": re.compile(r"[0-9a-fA-F]{8,64}")}


def file_hash(path: str | os.PathLike, algorithm: str = "md5") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_hash(path: Path, *, md5: str | None = None, sha256: str | None = None) -> str | None:
    """None when `path` matches every hash given (a sha256 may be a prefix), else what differs:
    "md5 <the file's>, expected <the given one>"."""
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        actual = file_hash(path, algorithm)
        if not actual.startswith(expected.lower()):
            return f"{algorithm} {actual}, expected {expected.lower()}"
    return None


class _Mismatch(Exception):
    """A whole file arrived but its hash is not the expected one."""


def _say(quiet: bool, line: str) -> None:
    if not quiet:
        print(f"reslab: {line}", file=sys.stderr)


def _fetch(url: str, out_path: Path, label: str, *, quiet: bool, timeout: float) -> None:
    """Stream `url` into `out_path`; a short read (connection dropped early) is an error here."""
    request = urllib.request.Request(url, headers={"User-Agent": "reslab"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(out_path, "wb") as out:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        received = 0
        progress = None
        if not quiet:
            from rich.markup import escape  # a file's name is text, not markup
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TransferSpeedColumn,
            )

            from reslab.console import live_bars_work

            progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                transient=True,
                disable=not live_bars_work(),
            )
            progress.start()
            task = progress.add_task(f"downloading {escape(label)}", total=total)
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

    `sha256` may be a prefix of the digest (8 hex digits at least). An existing `dest` that matches
    every hash given is reused; one that does not is deleted and fetched again. A transfer that
    breaks off, or a file with another hash, is fetched again `retries` more times; but when two
    downloads bring the same wrong file, the server holds another file than the one expected (or
    the expected hash is wrong), and a `ReslabError` says so at once. Nothing that failed a check
    is kept.
    """
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is not None and not _HEX[algorithm].fullmatch(expected):
            raise ReslabError(f"{algorithm} {expected!r} for {url} is not a hex digest; give the "
                              f"{'32' if algorithm == 'md5' else '64'} hex digits")
    dest = Path(dest)
    wrong = None  # the last mismatch seen, to tell a changed file from a corrupted transfer
    if dest.exists():
        wrong = check_hash(dest, md5=md5, sha256=sha256)
        if wrong is None:
            return dest
        _say(quiet, f"{dest} does not match its hash ({wrong}); downloading it again")
        dest.unlink()
    problem = ""
    for attempt in range(retries + 1):
        try:
            with atomic_path(dest) as tmp:
                _fetch(url, tmp, dest.name, quiet=quiet, timeout=timeout)
                mismatch = check_hash(tmp, md5=md5, sha256=sha256)
                if mismatch is not None:
                    raise _Mismatch(mismatch)
            return dest
        except _Mismatch as err:
            if str(err) == wrong:
                raise ReslabError(
                    f"hash mismatch: {url} sends a file with {err} (the same file twice, so not a broken "
                    f"transfer); the server holds another file than expected, or the expected hash is wrong. "
                    f"Nothing was kept: check the hash, or place the right file at {dest}"
                ) from None
            problem, wrong = f"hash mismatch: {err}", str(err)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            problem = str(getattr(err, "reason", None) or err)
        if attempt < retries:
            _say(quiet, f"download of {url} failed ({problem}); retrying")
            time.sleep(min(2.0**attempt, 5.0) * 0.1)
    raise ReslabError(
        f"could not download {url} after {retries + 1} attempts ({problem}); nothing was kept: "
        f"check the network, or place the file at {dest}"
    )
