"""reslab's data: embedded digits, CIFAR-10/100 and image folders, batched as uint8 tensors.

    bundle = load_data("cifar10", val_split=0.1)       # the paper's 45k/5k split
    loader = BatchLoader(bundle.train, 128, augment=bundle.augment, mean=bundle.mean, std=bundle.std)

`load_data` is where a data request enters: its arguments are checked there, once, and the loaders
below trust them.
"""

from __future__ import annotations

import os
from pathlib import Path

from reslab.data.augment import POLICIES
from reslab.data.bundle import DataBundle, Split
from reslab.data.download import download
from reslab.data.folder import DataWarning
from reslab.data.images import IMAGE_EXTENSIONS, preprocess_image
from reslab.data.loader import BatchLoader
from reslab.errors import ReslabError

__all__ = [
    "BatchLoader",
    "DataBundle",
    "DataWarning",
    "IMAGE_EXTENSIONS",
    "POLICIES",
    "Split",
    "data_path",
    "download",
    "load_data",
    "preprocess_image",
]

NAMED = ("digits", "cifar10", "cifar100")


def data_path(spec: str) -> str:
    """`spec` as a run or an experiment records it: a name stays a name; a path that exists becomes
    absolute, so that `--resume` from another working directory finds the same data."""
    if not isinstance(spec, str) or spec in NAMED:
        return spec
    path = Path(spec).expanduser()
    return os.path.abspath(path) if path.exists() else spec


def load_data(
    spec: str = "digits",
    *,
    image_size: int | None = None,
    val_split: float | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    quiet: bool = False,
) -> DataBundle:
    """Load a data set by name or path.

    spec: "digits" (embedded), "cifar10", "cifar100" (downloaded into the cache: `data_dir`, else
    reslab.io.cache_root(): $RESLAB_CACHE, else ~/.cache/reslab), a CIFAR tarball or extracted
    folder, or an image folder.
    image_size: stored H == W; None is the data's own (8 digits, 32 CIFAR, 224 folders).
    val_split: fraction of train held out for validation, stratified and seeded by `seed`.
      digits: default 0.125 of the non-test 80% (70/10/20 overall). CIFAR: default None (no val;
      0.1 is the paper's 45k/5k). Folders of class subfolders: default 0.2; 0 keeps all in train.
    """
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ReslabError(f"image size must be a positive integer, got {image_size!r}")
    if val_split is not None and (isinstance(val_split, bool) or not isinstance(val_split, (int, float))
                                  or not 0.0 <= val_split < 1.0):
        raise ReslabError(f"--val-split must be a fraction in [0, 1), got {val_split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ReslabError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        return _load(spec, image_size=image_size, val_split=val_split, seed=seed, data_dir=data_dir, quiet=quiet)
    except MemoryError as err:  # numpy's failed allocations
        problem = str(err) or "out of memory"
    except RuntimeError as err:  # torch's: "DefaultCPUAllocator: can't allocate memory: ..."
        if "allocate" not in str(err):
            raise
        problem = str(err).splitlines()[0]
        problem = problem[problem.find("DefaultCPUAllocator"):] if "DefaultCPUAllocator" in problem else problem
    raise ReslabError(f"{spec} at image size {image_size or 'default'} does not fit in memory ({problem[:200]}); "
                      "use a smaller --image-size")


def _load(spec: str, *, image_size, val_split, seed, data_dir, quiet) -> DataBundle:
    if spec == "digits":
        from reslab.data.digits import load_digits

        return load_digits(image_size=image_size, val_split=val_split, seed=seed)
    from reslab.data import cifar

    options = dict(image_size=image_size, val_split=val_split, seed=seed, data_dir=data_dir, quiet=quiet)
    path = Path(spec).expanduser()
    if cifar.is_cifar_data(spec):
        return cifar.load_cifar(spec, **options)
    if not path.exists():
        raise ReslabError(
            f"data not found: {spec!r}; give {', '.join(NAMED)}, an image folder or a CIFAR tarball"
        )
    if not path.is_dir():
        raise ReslabError(f"{spec} is a file; give an image folder (class subfolders) or a CIFAR .tar.gz")
    from reslab.data.folder import load_folder

    return load_folder(spec, **options)
