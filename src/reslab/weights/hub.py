"""Weights files in torch.hub's checkpoints folder, downloaded once and hash-checked.

torchvision and timm keep downloaded weights in `$TORCH_HOME/hub/checkpoints` (torch.hub.get_dir()),
under the file name of the URL; reslab uses the same folder and names, so a file either of them
already fetched is reused, and a person without a network can put the file there by hand.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
from pathlib import Path

import torch.hub

from reslab.errors import ReslabError


def checkpoints_dir() -> Path:
    """$TORCH_HOME/hub/checkpoints (torch.hub's own rule, so TORCH_HOME and torch.hub.set_dir apply)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_matches(path: Path, algorithm: str, expected: str) -> tuple[bool, str]:
    """(match, the file's digest); a sha256 `expected` may be a prefix (torch.hub's file-name rule)."""
    digest = file_digest(path, "md5" if algorithm == "md5" else "sha256")
    return digest.startswith(expected.lower()) if algorithm != "md5" else digest == expected.lower(), digest


def fetch(url: str, file_name: str, *, algorithm: str, expected: str, quiet: bool = False) -> Path:
    """The checked local copy of `url` in the checkpoints folder, downloaded if absent.

    A present file is checked too (it may have been placed by hand or cut short); one that fails is
    never used: a downloaded one is deleted, a placed one is reported with what to do.
    """
    dest = checkpoints_dir() / file_name
    if dest.is_file():
        ok, digest = hash_matches(dest, algorithm, expected)
        if ok:
            return dest
        raise ReslabError(
            f"{dest} has {algorithm} {digest}, expected {expected}: it is not the file of {url} (or it is "
            "truncated); delete it and run again to download it, or put the right file there"
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReslabError(f"cannot create {dest.parent} ({err.strerror}); set TORCH_HOME to a writable "
                          "folder") from None
    # torch.hub writes to a temporary name and renames only a complete file; its own check takes a
    # sha256 prefix, so other hashes are checked here after the download.
    prefix = expected.lower() if algorithm in ("sha256", "sha256_prefix") else None
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=prefix, progress=not quiet)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ReslabError(
            f"cannot download {url} ({reason}); with no network, put that file at {dest} (the folder "
            "torchvision and timm use) and run again"
        ) from None
    except RuntimeError as err:
        if "invalid hash value" not in str(err):
            raise
        raise ReslabError(
            f"{url} downloaded but its sha256 does not match the catalog ({err}); nothing was kept. The file on "
            "the server changed or the download was altered: check the network, or report it"
        ) from None
    if prefix is None:
        ok, digest = hash_matches(dest, algorithm, expected)
        if not ok:
            dest.unlink(missing_ok=True)
            raise ReslabError(
                f"{url} downloaded but its {algorithm} is {digest}, expected {expected}; nothing was kept: check "
                "the network, or report it"
            )
    return dest


def placed_file_hint(file_name: str) -> str:
    return os.fspath(checkpoints_dir() / file_name)
