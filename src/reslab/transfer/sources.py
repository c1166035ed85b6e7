"""Reading a `--pretrained` source into a plain state dict, without executing anything from it.

A source is a reslab run directory or weights file, a torch checkpoint (.pth/.pt/.th/.tar/.bin,
the state dict possibly nested under `state_dict`, `model`, ...), a foreign .safetensors file,
a Keras applications ResNet weights file, or an http(s) URL of any of these, downloaded once into
the cache and checked against a hash.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import urllib.parse
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reslab.errors import ReslabError
from reslab.transfer import keras

TORCH_SUFFIXES = (".pth", ".pt", ".th", ".tar", ".bin", ".ckpt")
# Where training scripts nest the weights inside a checkpoint dict (torchvision references,
# Lightning, the common CIFAR repos, timm's train.py).
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net", "state_dict_ema", "model_ema")
# torch.hub's convention: "resnet50-0676ba61.pth" carries the first hex digits of the file's sha256.
_HUB_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9.]+$")


@dataclass
class Loaded:
    """A source's tensors and where they came from (for the run's config.json)."""

    state: dict[str, torch.Tensor]
    kind: str  # reslab | torch | safetensors | keras
    path: Path
    sha256: str
    url: str | None = None
    info: dict = field(default_factory=dict)  # nested_under, keras architecture, reslab model...


def file_sha256(path: Path) -> str:
    from reslab.data.download import file_hash

    return file_hash(path, "sha256")


def split_url(source: str) -> tuple[str, str | None]:
    """The URL without fragment, and the sha256 given as `#sha256=<hex>`, if any."""
    url, _, fragment = source.partition("#")
    params = urllib.parse.parse_qs(fragment)
    sha = params.get("sha256", [None])[0]
    if fragment and sha is None:
        raise ReslabError(f"URL fragment #{fragment} is not understood; give the hash as #sha256=<64 hex digits>")
    return url, sha


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


def _cache_path(url: str) -> Path:
    from reslab.io import cache_root

    name = Path(urllib.parse.urlparse(url).path).name or "weights"
    # One folder per URL: the original file name is kept (its suffix tells the format, its hub-style
    # hash prefix is checked) and two hosts' "model.pth" never collide.
    return cache_root() / "weights" / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def _check_sha(path: Path, expected: str | None, actual: str, what: str) -> None:
    if expected is None:
        return
    if not re.fullmatch(r"[0-9a-fA-F]{8,64}", expected):
        raise ReslabError(f"sha256 {expected!r} is not a hex digest; give the 64 hex digits (or a prefix of them)")
    if not actual.startswith(expected.lower()):
        raise ReslabError(f"{what} {path} has sha256 {actual}, expected {expected}; the file is corrupt or another "
                          "one: delete it and try again, or check the hash")


def fetch(source: str, sha256: str | None, quiet: bool) -> tuple[Path, str]:
    """Download a URL source once into the cache, hash-checked; returns (local path, url).

    The expected hash (given, in the URL or in a hub-style file name) is checked by the download
    itself, before the file takes its place in the cache, so a bad file is never there to reuse.
    """
    from reslab.data.download import download

    url, fragment_sha = split_url(source)
    if sha256 and fragment_sha and sha256.lower() != fragment_sha.lower():
        raise ReslabError(f"two different hashes for {url}: #sha256={fragment_sha} in the URL and {sha256} given")
    expected = (sha256 or fragment_sha or "").lower() or None
    dest = _cache_path(url)
    hub = _HUB_NAME.search(dest.name)
    if hub and expected:
        short, long = sorted((hub.group(1), expected), key=len)
        if not long.startswith(short):
            raise ReslabError(f"two different hashes for {url}: its file name carries the sha256 prefix "
                              f"{hub.group(1)} and {expected} was given; check the hash")
        expected = long
    elif hub:
        expected = hub.group(1)
    return download(url, dest, sha256=expected, quiet=quiet), url


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unnest(obj, path: Path) -> tuple[dict, str]:
    where = []
    for _ in range(3):
        if _is_state_dict(obj):
            return dict(obj), ".".join(where)
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in NESTED_KEYS if k in obj), None)
        if key is None:
            break
        where.append(key)
        obj = obj[key]
    keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
    raise ReslabError(f"{path} holds no state dict (found {keys}); expected tensors by name, possibly nested under "
                      f"one of {', '.join(NESTED_KEYS)}")


def _read_torch(path: Path) -> tuple[dict, dict]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:160]
        raise ReslabError(
            f"{path} holds pickled Python objects, not only weights ({first}); reslab never runs code from a "
            "file: re-save it as a plain state dict (torch.save(model.state_dict(), path)) or as safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise ReslabError(f"{path} is not a readable torch checkpoint ({str(err).splitlines()[0][:160]}); "
                          "the file may be truncated or of another format") from None
    state, where = _unnest(obj, path)
    return state, ({"nested_under": where} if where else {})


def _read_safetensors(path: Path) -> tuple[dict, str, dict]:
    from safetensors import SafetensorError, safe_open

    from reslab.checkpoint import FORMAT, read_weights

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                return {k: f.get_tensor(k) for k in f.keys()}, "safetensors", {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ReslabError(f"{path} is not a readable safetensors file ({err}); the file may be truncated") from None
    state, ckpt = read_weights(path)
    return state, "reslab", {"model": ckpt.model, "model_options": ckpt.model_options, "classes": ckpt.classes}


def read_source(source: str, *, sha256: str | None = None, quiet: bool = False) -> Loaded:
    url = None
    if is_url(source):
        path, url = fetch(source, sha256, quiet)
    else:
        from reslab.checkpoint import resolve

        path = resolve(source)  # a run directory -> its best weights; errors name the path
    digest = file_sha256(path)
    if url is None:
        _check_sha(path, sha256, digest, "weights file")
    try:
        state, kind, info = _read(path)
    except ReslabError as err:
        if url is None:
            raise
        path.unlink(missing_ok=True)  # our unusable copy: a later run must fetch it again, not reuse it
        raise ReslabError(f"{err}; the downloaded copy was deleted from the cache") from None
    return Loaded(state, kind, path, digest, url, info)


def _read(path: Path) -> tuple[dict, str, dict]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if keras.is_keras_file(path):
        state, arch = keras.read_keras(path)
        return state, "keras", {"architecture": arch}
    if suffix in TORCH_SUFFIXES or zipfile.is_zipfile(path):
        state, info = _read_torch(path)
        return state, "torch", info
    raise ReslabError(f"{path}: unknown weights format {suffix or '(no suffix)'}; give a reslab run, a torch "
                      f"checkpoint ({'/'.join(TORCH_SUFFIXES)}), .safetensors or a Keras .h5 file")
