"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009), the data of the paper's section 4.2.

The official archives are downloaded once into the cache, checked against their published MD5 and
extracted beside it. The batches are Python pickles; they are read with an unpickler that can build
numpy arrays and nothing else, so a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reslab.data.bundle import DataBundle, Split, cached_stats, check_fits, resize_images, stratified_split
from reslab.data.download import download, file_hash
from reslab.errors import ReslabError
from reslab.io import cache_root

BASE_URL = "https://www.cs.toronto.edu/~kriz/"
COMPLETE = ".complete"  # written last into an extracted folder; without it the folder is partial


@dataclass(frozen=True)
class Archive:
    name: str
    file: str
    md5: str
    folder: str  # top-level folder inside the tarball
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


ARCHIVES = {
    "cifar10": Archive(
        "cifar10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        b"labels", b"label_names",
    ),
    "cifar100": Archive(
        "cifar100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
        ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names",
    ),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the callables numpy's own pickles use to rebuild an array."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # protocol <= 4 (the official files: Python 2)
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3 (str -> bytes)
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        # numpy 2 renamed numpy.core to numpy._core; old pickles name the old module.
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return getattr(importlib.import_module(module), name)


def read_batch(path: Path) -> dict:
    """One python-format CIFAR batch as a dict with bytes keys."""
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ReslabError(f"{path} is not a readable CIFAR batch ({err}); download it again") from None
    if not isinstance(batch, dict):
        raise ReslabError(f"{path} is not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    return batch


def _images_labels(path: Path, archive: Archive) -> tuple[np.ndarray, np.ndarray]:
    batch = read_batch(path)
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[archive.label_key], dtype=np.int64)
    except KeyError as err:
        raise ReslabError(f"{path} lacks the CIFAR batch key {err.args[0]!r}; download it again") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ReslabError(
            f"{path} holds {data.dtype} data of shape {data.shape} and {len(labels)} labels, "
            "not N x 3072 uint8 images with N labels; download it again"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _extract(tarball: Path, dest_root: Path, archive: Archive, advice: str) -> Path:
    """Extract into a temporary folder, check every batch is there, mark complete, then rename.
    `advice` ends the error when the tarball is not what it should be."""
    final = dest_root / archive.folder
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_root, prefix=f".{archive.folder}-"))
    try:
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            if isinstance(err, OSError) and err.errno is not None:  # the disk, not the archive (BadGzipFile)
                raise ReslabError(f"cannot extract {tarball} into {dest_root} ({err.strerror}); free some space "
                                  "there or give --data-dir on another disk") from None
            raise ReslabError(f"{tarball} is not a whole {archive.name} archive ({err}); {advice}") from None
        missing = [m for m in archive.members if not (tmp / archive.folder / m).is_file()]
        if missing:
            raise ReslabError(f"{tarball} lacks {archive.folder}/{missing[0]}, so it is not a {archive.name} "
                              f"archive; {advice}")
        (tmp / archive.folder / COMPLETE).write_text(f"{tarball.name}\n")
        if final.exists():  # a partial folder from an interrupted run
            shutil.rmtree(final)
        os.replace(tmp / archive.folder, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare(
    name: str,
    root: Path,
    *,
    base_url: str | None = None,
    md5: str | None = None,
    quiet: bool = False,
) -> Path:
    """The extracted folder of `name` under `root`, downloading and extracting it if needed.

    `base_url` (default $RESLAB_CIFAR_URL, else the official address) and `md5` (default the
    published one) exist so a mirror, or a test server, can stand in for the official site.
    """
    archive = ARCHIVES[name]
    folder = root / archive.folder
    if (folder / COMPLETE).exists():
        return folder
    base_url = base_url or os.environ.get("RESLAB_CIFAR_URL") or BASE_URL
    url = base_url.rstrip("/") + "/" + archive.file
    tarball = download(url, root / archive.file, md5=md5 or archive.md5, quiet=quiet)
    return _extract(tarball, root, archive, "delete it and run again")


def _archive_of_folder(path: Path) -> tuple[Archive, Path] | None:
    for archive in ARCHIVES.values():
        for folder in (path, path / archive.folder):
            if all((folder / m).is_file() for m in archive.members):
                return archive, folder
    return None


def is_cifar_data(spec: str) -> bool:
    """Whether --data `spec` names CIFAR-10/100, a CIFAR archive or an extracted CIFAR folder."""
    return spec in ARCHIVES or is_cifar_path(Path(spec).expanduser())


def is_cifar_path(path: Path) -> bool:
    """Whether a path given as --data is a CIFAR tarball or an extracted CIFAR folder."""
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz"))
    if not path.is_dir():
        return False
    for archive in ARCHIVES.values():
        for folder in (path, path / archive.folder):
            if (folder / archive.meta).is_file() or (folder / archive.train[0]).is_file():
                return True
    return False


def _local(path: Path, root: Path, quiet: bool) -> tuple[Archive, Path, str | None]:
    """The archive kind, extracted folder and tarball md5 of a user's own tarball or folder."""
    if path.is_dir():
        found = _archive_of_folder(path)
        if found is None:
            kinds = " or ".join(f"{a.folder}/{{{','.join(a.members)}}}" for a in ARCHIVES.values())
            raise ReslabError(f"{path} is not a complete extracted CIFAR folder; it needs {kinds}")
        return (*found, None)
    try:
        with tarfile.open(path, "r:gz") as tar:
            top = {Path(n).parts[0] for n in tar.getnames() if n}
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ReslabError(f"{path} is not a readable .tar.gz archive ({err}); download it again") from None
    archive = next((a for a in ARCHIVES.values() if a.folder in top), None)
    if archive is None:
        raise ReslabError(f"{path} holds neither cifar-10-batches-py/ nor cifar-100-python/")
    md5 = file_hash(path)
    if md5 != archive.md5:
        warnings.warn(
            f"{path} has md5 {md5}, not the official {archive.name} {archive.md5}; using it anyway",
            stacklevel=4,
        )
    # Extracted per archive hash, so a different tarball never reuses another's folder.
    dest = root / "local" / md5
    if (dest / archive.folder / COMPLETE).exists():
        return archive, dest / archive.folder, md5
    if not quiet:
        print(f"reslab: extracting {path}", file=sys.stderr)
    return archive, _extract(path, dest, archive, "download it again"), md5


def load_cifar(
    spec: str,
    *,
    image_size: int | None,
    val_split: float | None,
    seed: int,
    data_dir: str | None,
    quiet: bool,
) -> DataBundle:
    """CIFAR-10/100 from the cache (downloaded on first use), a local tarball or extracted folder.

    `val_split=None` gives no validation split (val is None; the trainer then reports test
    accuracy); `val_split=0.1` is the paper's 45k/5k train/val split (section 4.2), stratified and
    seeded. Images are stored at `image_size` (default 32); 224 keeps 7.5 GB of CIFAR-10 in memory.
    """
    root = cache_root(data_dir)
    if spec in ARCHIVES:
        archive = ARCHIVES[spec]
        folder, md5 = prepare(spec, root, quiet=quiet), archive.md5
    else:
        archive, folder, md5 = _local(Path(spec).expanduser(), root, quiet)

    def read(members):
        parts = [_images_labels(folder / m, archive) for m in members]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    train_x, train_y = read(archive.train)
    test_x, test_y = read(archive.test)
    meta = read_batch(folder / archive.meta)
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[archive.names_key]]
    except KeyError:
        raise ReslabError(f"{folder / archive.meta} lacks {archive.names_key!r}; download it again") from None
    for labels in (train_y, test_y):
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ReslabError(f"{folder} has labels outside 0..{len(classes) - 1}; download it again")

    size = image_size or 32
    check_fits(archive.name, len(train_x) + len(test_x), 3, size)
    images = resize_images(torch.from_numpy(train_x), size)
    labels = torch.from_numpy(train_y)
    train, val = Split(images, labels), None
    if val_split:
        train_index, val_index = stratified_split(train_y, val_split, seed)
        train, val = train.subset(train_index), train.subset(val_index)
    test = Split(resize_images(torch.from_numpy(test_x), size), torch.from_numpy(test_y))

    # Cached outside the data folder (which may be the user's, read-only), keyed by what decides them.
    files = [(m, (folder / m).stat().st_size, (folder / m).stat().st_mtime_ns) for m in archive.train]
    key = repr((str(folder), files, val_split, seed if val_split else 0, size))
    stats_path = root / "stats" / f"{archive.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    mean, std = cached_stats(stats_path, lambda: train.images)
    return DataBundle(
        name=spec,
        classes=classes,
        train=train,
        val=val,
        test=test,
        in_channels=3,
        image_size=size,
        mean=mean,
        std=std,
        augment="cifar",
        source={
            "kind": archive.name,
            "path": str(folder),
            "md5": md5,
            "val_split": val_split,
            "seed": seed,
            "sizes": {"train": len(train), "val": len(val) if val else 0, "test": len(test)},
        },
        resize="center_crop",
    )
