"""Image folders: class subfolders (split by a seeded fraction) or train/ + val/ + test/.

On a 2-core CPU, decoding and resizing JPEGs costs more than a small network's training step, so
each image is decoded once (worker processes, JPEG draft mode), resized to the training size and
kept in an on-disk uint8 cache keyed by the files' paths, sizes and times; later loads only read
that array back.
"""

from __future__ import annotations

import concurrent.futures
import errno
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reslab.data.bundle import DataBundle, Split, cached_stats, check_fits, stratified_split
from reslab.data.images import IMAGE_EXTENSIONS, IMAGE_FORMATS, decode_image
from reslab.errors import ReslabError
from reslab.hardware import format_bytes
from reslab.io import cache_root

DEFAULT_IMAGE_SIZE = 224
DEFAULT_VAL_SPLIT = 0.2  # as image_dataset_from_directory(validation_split=0.2) in the course
RESIZE = "center_crop"
SPLIT_NAMES = ("train", "val", "test")
# Bump when decoding changes, so old caches are not mistaken for new ones.
CACHE_VERSION = 1
# Above this the decoded cache is memory-mapped instead of read into memory.
MMAP_BYTES = 2 << 30
# Below this many files, starting worker processes costs more than it saves.
MIN_FILES_FOR_WORKERS = 64


# A photo folder trained from scratch (no --pretrained, the fast recipe) and given no --model: the
# model, input size and ingredients that learned best within a wall-clock budget on 2 CPU cores
# (benchmarks/RESULTS.md, "Small photo folders"); every one of them gives way to its option.
PHOTO_DEFAULTS = {"model": "resnet18", "stem": "imagenet", "image_size": 112, "epochs": 30, "lr": 0.05,
                  "augment": "trivial", "random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0, "ema": 0.0}
# The part of PHOTO_DEFAULTS that is one choice with the model: an explicit --model keeps its own.
# Everything else (epochs, lr, augmentation, mirror, ingredients) is chosen by the folder and stays
# with an explicit --model: measured, what hurt the issue-20 run (`--model resnet20` on MNIST digits)
# was photo settings on small images, not the --model (benchmarks/RESULTS.md, "Small images:
# defaults measured").
PHOTO_MODEL_CHOICE = ("stem", "image_size")
# Images this small (MNIST's 28 px, CIFAR's 32: the median shorter side of a sample) take the CIFAR
# net at its own 32 px instead: upscaling them to 112 px for resnet18 costs 12x the arithmetic and
# adds no detail.
SMALL_IMAGE_SIDE = 40
SMALL_PHOTO_MODEL = {"model": "resnet20", "stem": None, "image_size": 32}
# Small *gray* images (digits, letters, handwriting, scans: MNIST's kind) take no augmentation
# (`none`) instead of TrivialAugment, the fast recipe's own peak lr (0.2; PHOTO_DEFAULTS' 0.05 is
# resnet18's on photos), and no mirror image in training. Measured on 5,000 real MNIST digits
# (benchmarks/RESULTS.md, "Small images: defaults measured"): at the 3 epochs `none` beat the
# plain `folder` policy on both seeds (0.984 / 0.978 against 0.974 / 0.971), TrivialAugment and lr
# 0.05 were worse, and the mirror cost 3.4 points (a mirrored digit or letter is no longer one); at 30
# epochs `none` and `folder` tied (one seed). Gray is read from the pixels (folder_facts).
SMALL_IMAGE_RECIPE = {"augment": "none", "flip": False}
# Small *colour* images (CIFAR's kind) take the paper's flip and 4-pixel pad-and-crop (`cifar`, section
# 4.2) instead of the photos' random-resized crop + TrivialAugment, and keep the photo lr 0.05 (at
# batch 64: the paper's 0.1 at 128). Measured on the CIFAR-10 JPEG copy's 45k/5k split (benchmarks/
# RESULTS.md, "CIFAR-sized folders: the augmentation"): 5 epochs, resnet20, seed 0, best validation
# 0.786 with `cifar` against 0.740 with `trivial`; a short schedule of a small net underfits, and the
# heavier policy costs more than it regularizes.
SMALL_COLOUR_RECIPE = {"augment": "cifar"}
# Under --budget, small colour images (and the CIFAR data sets, `cifar_budget_choice`) train Page's
# ResNet-9 at a quarter of its width instead of resnet20: on the CIFAR-10 JPEG copy's 45k/5k split a
# 30-minute budget on 2 CPU cores gave it 21 epochs and 0.861 best validation (0.873 with the
# test-time flip) against resnet20's 13 epochs and 0.838, and the half-width net's 8 epochs and 0.854
# (benchmarks/RESULTS.md, "CIFAR-10 in 30 minutes: the net"). Measured under a budget only: a run
# of fixed epochs keeps resnet20.
SMALL_COLOUR_BUDGET_MODEL = {"model": "myrtle_resnet9_quarter", "stem": None, "image_size": 32}
SMALL_COLOUR_BUDGET_WHY = ("small colour images under a budget take Page's ResNet-9 at a quarter width at 32 px "
                           "and the paper's flip and 4-pixel crop")
# PHOTO_DEFAULTS' 30 epochs are for a folder of about 2,000 images (the measured task); a bigger one
# gets fewer, so that about PHOTO_IMAGES_SEEN images are shown in all, but never fewer than the fast
# recipe's 6: 60,000 MNIST-style images train 6 epochs, not 30.
PHOTO_IMAGES_SEEN = 60_000
PHOTO_MIN_EPOCHS = 6
FACT_SAMPLE = 32
# Image modes that hold one channel, and how far (in 8-bit levels) colour channels may differ in an
# image still taken as gray (lossy JPEG chroma leaves a few levels of noise).
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
GRAY_TOLERANCE = 8


@functools.lru_cache(maxsize=16)
def folder_facts(spec: str) -> tuple[int, int, bool]:
    """(image files, median shorter side in pixels, whether they are grayscale) of an image folder,
    from up to FACT_SAMPLE files spread over it: names and headers, and the pixels of small images
    only (a colour header can hold gray pixels, as MNIST saved as RGB does; decoding 32 small images
    costs milliseconds)."""
    from PIL import Image

    root = Path(spec).expanduser()
    files = [f for f in _walk(root) if f.suffix.lower() in IMAGE_EXTENSIONS]
    sides, grays = [], []
    for path in files[:: max(1, len(files) // FACT_SAMPLE)][:FACT_SAMPLE]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
                grays.append(_is_gray(image))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # a corrupt file is the loader's to report
    return len(files), int(np.median(sides)) if sides else 0, bool(grays) and all(grays)


def _is_gray(image) -> bool:
    """Whether an open PIL image holds one channel of information: a gray mode, or (small images only)
    colour channels that are equal everywhere."""
    if image.mode in GRAY_MODES:
        return True
    if min(image.size) > SMALL_IMAGE_SIDE:
        return False
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return bool(np.abs(pixels - pixels[..., :1]).max() <= GRAY_TOLERANCE)


def photo_choice(spec: str, budget: bool = False) -> tuple[dict, str]:
    """PHOTO_DEFAULTS adapted to the folder `spec` (its image size and count), and why, in words (with
    a `budget`, the budget fixes the epochs, so the words leave them out)."""
    count, side, gray = folder_facts(spec)
    chosen = dict(PHOTO_DEFAULTS)
    epochs = min(PHOTO_DEFAULTS["epochs"], max(PHOTO_MIN_EPOCHS, round(PHOTO_IMAGES_SEEN / max(count, 1))))
    chosen["epochs"] = epochs
    why = facts = f"{count:,} images of about {side} px"
    if 0 < side <= SMALL_IMAGE_SIDE:
        chosen.update(SMALL_PHOTO_MODEL)
        why += f": small {'gray ' if gray else ''}images take the CIFAR net at {SMALL_PHOTO_MODEL['image_size']} px"
        if gray:
            chosen.update(SMALL_IMAGE_RECIPE)
            chosen.pop("lr")  # the recipe's own
            why += ", the recipe's lr, no augmentation and no mirror"
        else:
            chosen.update(SMALL_COLOUR_RECIPE)
            why += ", the paper's flip and 4-pixel crop"
            if budget:
                chosen.update(SMALL_COLOUR_BUDGET_MODEL)
                why = f"{facts}: {SMALL_COLOUR_BUDGET_WHY}"
    if epochs != PHOTO_DEFAULTS["epochs"] and not budget:
        why += f"; {epochs} epochs show about {PHOTO_IMAGES_SEEN:,} images"
    return chosen, why


def cifar_budget_choice() -> tuple[dict, str]:
    """What a CIFAR data set (--data cifar10, cifar100, a CIFAR archive) trains from scratch under
    --budget, and why: the small colour folders' budget choice (model, lr, augmentation), so the
    lossless CIFAR-10 and a folder of its JPEGs take the same path."""
    chosen = {**SMALL_COLOUR_BUDGET_MODEL, "lr": PHOTO_DEFAULTS["lr"], **SMALL_COLOUR_RECIPE}
    return chosen, "CIFAR's 32 px colour images under a budget: the choice for small colour folders"


def is_image_folder(spec: str) -> bool:
    """Whether --data `spec` names an image folder (rather than digits, CIFAR, or nothing)."""
    from reslab.data import cifar

    if spec in ("digits", *cifar.ARCHIVES):
        return False
    path = Path(spec).expanduser()
    return path.is_dir() and not cifar.is_cifar_path(path)


class DataWarning(UserWarning):
    """Something in the user's data was skipped; the run goes on."""


@dataclass
class _Scan:
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # split -> [(path relative to root, label)], sorted
    skipped: dict[str, str]  # relative path -> why it is not used (not an image, a broken link)


def _visible(entries) -> list[Path]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda p: p.name)


def _walk(folder: Path) -> list[Path]:
    """Every visible file below `folder`, in an order that is the same on any machine."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _unusable(path: Path) -> str | None:
    """Why `path` (an image by its name) cannot be read, or None. A symbolic link that loops or
    points nowhere is listed by os.walk like a file; it is skipped as a corrupt image would be."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            return "symbolic link to a missing file"
        return err.strerror or str(err)
    return None


def _scan_classes(root: Path, folder: Path, classes: list[str] | None, skipped: dict[str, str]):
    dirs = [d for d in _visible(folder.iterdir()) if d.is_dir()]
    if not dirs:
        raise ReslabError(
            f"{folder} has no class subfolders; put each class's images in a subfolder named after it"
        )
    names = [d.name for d in dirs]
    if classes is not None:
        missing = sorted(set(classes) - set(names))
        extra = sorted(set(names) - set(classes))
        if missing:
            raise ReslabError(
                f"{folder} has no folder for class {', '.join(missing)} (train/ has {', '.join(classes)}); "
                "add it with its images"
            )
        if extra:
            raise ReslabError(
                f"{folder} has class {', '.join(extra)} that train/ lacks; add it to train/ or remove it"
            )
    classes = classes or names
    files = []
    for d in dirs:
        label = classes.index(d.name)
        entries = _walk(d)
        if not entries:
            raise ReslabError(f"class folder {d} is empty; add images to it or remove it")
        found = 0
        for path in entries:
            rel = path.relative_to(root).as_posix()
            why = "not an image file" if path.suffix.lower() not in IMAGE_EXTENSIONS else _unusable(path)
            if why is None:
                files.append((rel, label))
                found += 1
            else:
                skipped[rel] = why
        if not found:
            # Caught here, by name, rather than after decoding: nothing in the folder is worth decoding.
            others = [p.relative_to(d).as_posix() for p in entries]
            raise ReslabError(
                f"class folder {d} holds no readable image, only {len(others)} other file"
                f"{'s' if len(others) > 1 else ''} ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                f"add {IMAGE_FORMATS} images to it or remove it"
            )
    return classes, files


def _scan(root: Path) -> _Scan:
    subdirs = [d.name for d in _visible(root.iterdir()) if d.is_dir()]
    skipped: dict[str, str] = {}
    if subdirs and set(subdirs) <= set(SPLIT_NAMES):
        files = {}
        classes = None
        # train/ defines the classes; val/ and test/ must hold the same ones.
        for name in sorted(subdirs, key=SPLIT_NAMES.index):
            classes, files[name] = _scan_classes(root, root / name, classes, skipped)
        return _Scan(classes, files, skipped)
    classes, files = _scan_classes(root, root, None, skipped)
    return _Scan(classes, {"all": files}, skipped)


def _decode_job(args):
    path, image_size, resize = args
    try:
        return decode_image(path, image_size, 3, resize), None
    except Exception as err:  # a corrupt file must never stop the load; it is reported instead
        return None, f"{type(err).__name__}: {err}"


def _cache_key(root: Path, rels: list[str], image_size: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, image_size, RESIZE]).encode())
    for rel in rels:
        st = (root / rel).stat()
        digest.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def _decode_all(root: Path, rels: list[str], image_size: int, out: np.ndarray, workers: int, quiet: bool):
    """Decode into `out` (N x 3 x S x S); returns {relative path: why it could not be read}."""
    errors = {}
    jobs = [(root / rel, image_size, RESIZE) for rel in rels]
    progress = None
    if not quiet:
        from rich.markup import escape  # a folder's name is text, not markup
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        from reslab.console import live_bars_work

        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
            disable=not live_bars_work(),
        )
        progress.start()
        progress.add_task(f"decoding {escape(root.name)}", total=len(jobs))
    try:
        if workers > 1:
            # fork: workers start in milliseconds and only ever run PIL and numpy.
            context = multiprocessing.get_context("fork" if os.name == "posix" else None)
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                results = pool.map(_decode_job, jobs, chunksize=16)
                for i, (array, error) in enumerate(results):
                    _store(out, i, array, error, rels, errors, progress)
        else:
            for i, job in enumerate(jobs):
                array, error = _decode_job(job)
                _store(out, i, array, error, rels, errors, progress)
    finally:
        if progress is not None:
            progress.stop()
    return errors


def _store(out, i, array, error, rels, errors, progress):
    if array is None:
        errors[rels[i]] = error
    else:
        out[i] = array
    if progress is not None:
        progress.advance(progress.task_ids[0])


def _load_cached(root: Path, rels: list[str], image_size: int, cache: Path, workers, quiet):
    """The decoded images of `rels` (uint8 N x 3 x S x S) and their read errors, via the cache."""
    key = _cache_key(root, rels, image_size)
    entry = cache / key
    if not (entry / "index.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        # The decoded array is a memory map: a full disk would surface as a SIGBUS mid-decode.
        need, free = len(rels) * 3 * image_size**2, shutil.disk_usage(cache).free
        if need > free:
            raise ReslabError(
                f"decoding {root} at image size {image_size} needs {format_bytes(need)} in the cache {cache}, "
                f"which has {format_bytes(free)} free; free some space, give --data-dir on a larger disk, "
                "or use a smaller --image-size"
            )
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{key}-"))
        try:
            out = np.lib.format.open_memmap(
                tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(rels), 3, image_size, image_size)
            )
            if workers is None:
                workers = (os.cpu_count() or 1) if len(rels) >= MIN_FILES_FOR_WORKERS else 1
            errors = _decode_all(root, rels, image_size, out, workers, quiet)
            out.flush()
            del out
            index = {"version": CACHE_VERSION, "root": str(root), "image_size": image_size,
                     "resize": RESIZE, "files": rels, "errors": errors}
            # index.json is written last: a cache entry without it is incomplete and never used.
            (tmp / "index.json").write_text(json.dumps(index))
            try:
                tmp.rename(entry)
            except OSError:  # another process finished the same entry first; theirs is as good
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    index = json.loads((entry / "index.json").read_text())
    path = entry / "images.npy"
    big = path.stat().st_size > MMAP_BYTES
    # Copy-on-write mapping: pages are read on demand and torch gets a writable array.
    images = np.load(path, mmap_mode="c" if big else None)
    return torch.from_numpy(images), index["errors"], entry


def _warn_skipped(root: Path, skipped: dict[str, str]) -> None:
    if not skipped:
        return
    names = ", ".join(f"{rel} ({why})" for rel, why in list(skipped.items())[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    warnings.warn(
        f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} in {root} that are not readable "
        f"images: {names}{more}",
        DataWarning,
        stacklevel=4,
    )


def load_folder(
    spec: str,
    *,
    image_size: int | None,
    val_split: float | None,
    seed: int,
    data_dir: str | None,
    quiet: bool,
    workers: int | None = None,
) -> DataBundle:
    """A folder of class subfolders, or of train/ with val/ and/or test/, as a DataBundle.

    Class subfolders only: `val_split` (default 0.2) of each class, chosen by `seed`, is held out
    as val; test is None; `val_split=0` keeps everything in train (what `evaluate` wants). With
    train/ + val/: `val_split` is refused, since val/ already decides. With train/ and test/ but no
    val/: `val_split` (default 0.2) is carved out of train/. With no train/ (e.g. only test/ for
    evaluation), train is empty.

    Images are converted to RGB, then resized: shorter side to `image_size` (default 224), centre
    crop. Files that cannot be read are skipped with one `DataWarning`.
    """
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise ReslabError(f"data folder not found: {spec}; give digits, cifar10, cifar100 or an image folder")
    root = root.resolve()
    size = image_size or DEFAULT_IMAGE_SIZE
    scan = _scan(root)
    ordered = [(split, rel, label) for split, items in scan.files.items() for rel, label in items]
    rels = [rel for _, rel, _ in ordered]
    check_fits(str(root), len(rels), 3, size)
    images, errors, entry = _load_cached(root, rels, size, cache_root(data_dir) / "folders", workers, quiet)
    _warn_skipped(root, {**scan.skipped, **errors})

    labels = torch.tensor([label for _, _, label in ordered], dtype=torch.int64)
    readable = torch.tensor([rel not in errors for rel in rels], dtype=torch.bool)
    splits: dict[str, torch.Tensor] = {}
    for name in scan.files:
        in_split = torch.tensor([split == name for split, _, _ in ordered], dtype=torch.bool) & readable
        splits[name] = torch.nonzero(in_split).flatten()
        present = set(labels[splits[name]].tolist())
        for label, cls in enumerate(scan.classes):
            if label not in present:
                where = root / cls if name == "all" else root / name / cls
                raise ReslabError(f"class folder {where} holds no readable image; add images to it")

    if "all" in splits:
        fraction = DEFAULT_VAL_SPLIT if val_split is None else val_split
        layout = "classes"
        index = splits.pop("all")
    else:
        layout = "splits"
        index = splits.pop("train", torch.zeros(0, dtype=torch.int64))
        fraction = val_split
        if "val" in splits and val_split is not None:
            raise ReslabError(
                f"--val-split {val_split} conflicts with {root / 'val'}; drop --val-split or remove val/"
            )
        if "val" not in splits and val_split is None and "train" in scan.files:
            fraction = DEFAULT_VAL_SPLIT
    if fraction:
        train_pos, val_pos = stratified_split(labels[index].numpy(), fraction, seed)
        splits["val"] = index[torch.from_numpy(val_pos)]
        index = index[torch.from_numpy(train_pos)]

    def split(part: torch.Tensor | None) -> Split | None:
        if part is None or len(part) == 0:
            return None
        return Split(images[part].contiguous(), labels[part].clone(), [str(root / rels[i]) for i in part.tolist()])

    empty = Split(torch.zeros((0, 3, size, size), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    train = split(index) or empty
    val, test = split(splits.get("val")), split(splits.get("test"))
    # With no train/ (a folder for evaluation only) the stats describe what there is.
    stats_index = next(i for i in (index, splits.get("val"), splits.get("test")) if i is not None and len(i))
    stats_key = hashlib.sha256("\0".join(rels[i] for i in stats_index).encode()).hexdigest()[:16]
    mean, std = cached_stats(
        entry / f"stats-{stats_key}.json", lambda: train.images if len(train) else split(stats_index).images
    )
    return DataBundle(
        name=spec,
        classes=list(scan.classes),
        train=train,
        val=val,
        test=test,
        in_channels=3,
        image_size=size,
        mean=mean,
        std=std,
        augment="folder",
        source={
            "kind": "folder",
            "path": str(root),
            "layout": layout,
            "val_split": fraction,
            "seed": seed,
            "sizes": {"train": len(train), "val": len(val or ()), "test": len(test or ())},
            "skipped": len(errors) + len(scan.skipped),
            "cache": str(entry),
        },
        resize=RESIZE,
    )
