"""The pretrained-weights catalog: `MODEL.TAG` names (timm's convention), each a line of data.

An entry says where the file is (URL and hash), where it comes from (source, licence, published
accuracy) and how the weights want their input (the preprocessing they were trained with, and
their class names). The architecture stays in reslab.models; an entry only names it.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PurePosixPath
from urllib.parse import urlparse

from reslab.errors import ReslabError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
# Keras's "caffe" preprocessing: BGR channels minus the ImageNet mean pixel, on the 0-255 scale, not
# divided by anything. In reslab's (x/255 - mean)/std form: mean/255 and std 1/255. The weights' BGR
# order is folded into the first convolution when they are loaded (its input channels reversed: a
# convolution is linear in its input channels, so this is exact), so the model reads RGB like any other.
CAFFE_MEAN = (123.68 / 255, 116.779 / 255, 103.939 / 255)
CAFFE_STD = (1 / 255, 1 / 255, 1 / 255)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the weights' input: resize the shorter side to `resize_size`, crop the
    centre `image_size` square, scale RGB to [0, 1], subtract `mean`, divide by `std`."""

    image_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_dict(self) -> dict:
        """The preprocessing dict reslab's checkpoints carry (see reslab.data.DataBundle.preprocessing)."""
        return {"image_size": self.image_size, "in_channels": 3, "mean": list(self.mean), "std": list(self.std),
                "resize": "center_crop", "resize_size": self.resize_size, "interpolation": self.interpolation}


@dataclass(frozen=True)
class WeightsEntry:
    name: str  # MODEL.TAG
    url: str
    hash: str  # hex digest, or the leading hex digits torch.hub puts in file names
    hash_algorithm: str  # "sha256" (a full digest or a prefix of one) or "md5" (Keras's published hashes)
    source: str  # who trained and published them
    licence: str
    top1: float | None  # published accuracy on the classes' own test/validation set, a fraction
    top5: float | None
    preprocessing: Preprocessing
    classes: str | tuple[str, ...]  # "imagenet1k", "cifar10", or the names themselves
    model_options: dict = field(default_factory=dict)  # create_model options the weights need
    file_name: str | None = None  # in $TORCH_HOME/hub/checkpoints; default: the URL's file name
    top1_image_size: int | None = None  # where the published accuracy was measured at another size
    bgr_input: bool = False  # trained on BGR images (Keras's caffe weights): conv1 is flipped on load
    notes: str = ""

    @property
    def model(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def tag(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def local_name(self) -> str:
        return self.file_name or PurePosixPath(urlparse(self.url).path).name

    def class_names(self) -> list[str]:
        return list(self.classes) if isinstance(self.classes, tuple) else class_names(self.classes)


_CATALOG: dict[str, WeightsEntry] = {}


def register_weights(entry: WeightsEntry) -> WeightsEntry:
    if "." not in entry.name:
        raise ValueError(f"weights name {entry.name!r} is not MODEL.TAG")
    if entry.name in _CATALOG:
        raise ValueError(f"weights {entry.name!r} are already registered")
    if entry.hash_algorithm not in ("sha256", "md5"):
        raise ValueError(f"weights {entry.name!r}: hash_algorithm must be sha256 or md5")
    _CATALOG[entry.name] = entry
    return entry


def unregister_weights(name: str) -> None:
    _CATALOG.pop(name, None)


def is_weights_name(source: str) -> bool:
    """Whether `source` has the MODEL.TAG shape and names a registered model or entry (not a path)."""
    if source in _CATALOG:
        return True
    model, dot, tag = source.partition(".")
    return bool(dot) and "/" not in source and any(e.model == model for e in _CATALOG.values())


def get_weights(name: str) -> WeightsEntry:
    entry = _CATALOG.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(_CATALOG), n=4, cutoff=0.6)
        model = name.partition(".")[0]
        same_model = [n for n in _CATALOG if n.startswith(model + ".")]
        hint = (f"did you mean {', '.join(close)}?" if close else
                f"{model} has {', '.join(same_model)}" if same_model else
                "run `reslab models --pretrained` for the catalog")
        raise ReslabError(f"unknown pretrained weights {name!r}: {hint}")
    return entry


def list_weights(model: str | None = None) -> list[WeightsEntry]:
    return [e for e in _CATALOG.values() if model is None or e.model == model]


def default_weights(model: str, classes: str = "imagenet1k") -> WeightsEntry:
    """The best entry of `model` for `classes` (by published top-1): what `--pretrained imagenet` means."""
    entries = [e for e in list_weights(model) if e.classes == classes]
    if not entries:
        have = sorted({e.model for e in _CATALOG.values() if e.classes == classes})
        raise ReslabError(f"no {classes} weights for {model} in the catalog; models with them: {', '.join(have)}")
    # Accuracies measured at the entry's own input size first: a figure at a larger test size flatters.
    return max(entries, key=lambda e: (e.top1_image_size in (None, e.preprocessing.image_size), e.top1 or 0.0))


def find_by_digest(sha256: str) -> WeightsEntry | None:
    """The entry whose file has this sha256 (full digest or torch.hub prefix), whatever the file's name."""
    for entry in _CATALOG.values():
        if entry.hash_algorithm == "sha256" and sha256.startswith(entry.hash.lower()):
            return entry
    return None


def find_by_md5(md5: str) -> WeightsEntry | None:
    return next((e for e in _CATALOG.values() if e.hash_algorithm == "md5" and e.hash.lower() == md5), None)


@functools.cache
def _imagenet_classes() -> tuple[str, ...]:
    text = resources.files("reslab.weights").joinpath("imagenet_classes.txt").read_text()
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(names) == 1000, len(names)
    return names


def class_names(kind: str) -> list[str]:
    if kind == "imagenet1k":
        return list(_imagenet_classes())
    if kind == "cifar10":
        return list(CIFAR10_CLASSES)
    raise ValueError(f"unknown class set {kind!r}")
