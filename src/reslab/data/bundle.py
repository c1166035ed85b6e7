"""What every data source hands the trainer: uint8 image tensors, labels, class names and stats.

Images stay uint8 until a batch is drawn (a quarter of float32's memory and bandwidth; the
conversion is one fused op per batch), which is what lets all of CIFAR live in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reslab.hardware import check_memory
from reslab.io import write_text

# preprocess_image's resize modes: keep the aspect ratio and crop the middle, or stretch.
RESIZE_MODES = ("center_crop", "squash")


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W (possibly memory-mapped for big folders)
    labels: torch.Tensor  # int64, N
    # Each image's file (absolute path) for image folders, so that a mistake can be traced back to
    # its photo (evaluate's top_losses, misclassified); None where images come from arrays (digits, CIFAR).
    paths: list[str] | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"Split.images must be uint8 NxCxHxW: {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"Split.labels must have shape ({len(self.images)},), not {self.labels.shape}")
        if self.paths is not None and len(self.paths) != len(self.labels):
            raise ValueError(f"Split.paths must have {len(self.labels)} entries, not {len(self.paths)}")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | np.ndarray) -> Split:
        index = torch.as_tensor(index, dtype=torch.int64)
        paths = None if self.paths is None else [self.paths[i] for i in index.tolist()]
        return Split(self.images[index].contiguous(), self.labels[index].clone(), paths)

    def pixel_mean(self) -> torch.Tensor:
        """The per-pixel mean image (C x H x W, [0,1] units) that paper section 4.2 subtracts."""
        total = torch.zeros(self.images.shape[1:], dtype=torch.float64)
        for start in range(0, len(self), 4096):
            total += self.images[start : start + 4096].sum(0, dtype=torch.float64)
        return (total / max(len(self), 1) / 255.0).float()


@dataclass
class DataBundle:
    name: str  # "digits", "cifar10", "cifar100" or the folder path as given
    classes: list[str]  # class names in label order
    train: Split
    val: Split | None
    test: Split | None
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, of the train split, [0,1] units
    std: tuple[float, ...]
    augment: str  # default policy in reslab.data.augment.POLICIES
    source: dict = field(default_factory=dict)  # JSON-able provenance for config.json
    resize: str = "center_crop"  # how preprocess_image fits a new image to image_size

    def preprocessing(self) -> dict:
        """What a checkpoint stores so `preprocess_image(img, **this)` matches training's input."""
        return {
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "interpolation": "bilinear",
        }

    def splits(self) -> dict[str, Split]:
        return {k: s for k, s in (("train", self.train), ("val", self.val), ("test", self.test)) if s}


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0,1] units (population std), exact.

    A 256-bin histogram per channel gives both moments without a float copy of the images.
    """
    channels = images.shape[1]
    if images.shape[0] == 0:
        return (0.5,) * channels, (0.25,) * channels
    counts = torch.zeros(channels, 256, dtype=torch.float64)
    for start in range(0, images.shape[0], 1024):
        chunk = images[start : start + 1024]
        for c in range(channels):
            counts[c] += torch.bincount(chunk[:, c].flatten(), minlength=256).double()
    levels = torch.arange(256, dtype=torch.float64)
    n = counts.sum(1)
    mean = (counts * levels).sum(1) / n
    std = ((counts * (levels - mean[:, None]) ** 2).sum(1) / n).sqrt()
    # A constant channel would divide by zero when normalizing.
    std = std.clamp_min(1e-3 * 255)
    return tuple(float(m) / 255 for m in mean), tuple(float(s) / 255 for s in std)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out), `fraction` of each class held out, both sorted ascending.

    Only a numpy Generator seeded from (seed, class) decides, so the same labels in the same
    order give the same split on any machine; a class keeps at least one training example.
    """
    labels = np.asarray(labels)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_held = min(int(round(fraction * len(members))), len(members) - 1)
        rng = np.random.default_rng([seed, int(c)])
        held.append(rng.permutation(members)[:n_held])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), held_out)
    return train.astype(np.int64), held_out.astype(np.int64)


def check_fits(name: str, n: int, channels: int, image_size: int) -> None:
    """Refuse, before anything is allocated, `n` images that decoded as uint8 at `image_size` cannot
    fit in memory, naming a size that would (with room left for the model and its batches)."""

    def advice(available: int) -> str:
        fit = math.isqrt(available // 2 // max(n * channels, 1))
        return f"use --image-size {fit} or less" if fit else "use fewer images or a machine with more memory"

    check_memory(n * channels * image_size**2,
                 f"{name} at image size {image_size} ({n} images of {channels}x{image_size}x{image_size} bytes)",
                 advice)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x C x H x W resized to size x size (bilinear, antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], 512):
        chunk = images[start : start + 512].float()
        chunk = torch.nn.functional.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + 512] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


Stats = tuple[tuple[float, ...], tuple[float, ...]]


def cached_stats(path: Path, images: Callable[[], torch.Tensor]) -> Stats:
    """channel_stats of `images()`, kept in the JSON file `path` (best effort: it may be read-only)."""
    try:
        saved = json.loads(path.read_text())
        return tuple(saved["mean"]), tuple(saved["std"])
    except (OSError, ValueError, KeyError):
        pass
    mean, std = channel_stats(images())
    try:
        write_text(path, json.dumps({"mean": mean, "std": std}))
    except OSError:
        pass
    return mean, std
