"""Augmentation of whole uint8 batches with tensor ops: no per-image Python, no PIL.

Every random draw comes from the `torch.Generator` passed in, on the CPU, so a batch's
augmentation is a pure function of that generator's seed whatever device the pixels are on.
Geometric transforms (resized crop, flip, rotation, zoom) are folded into one affine matrix per
image and applied with a single `grid_sample` over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reslab.errors import ReslabError


@dataclass(frozen=True)
class Policy:
    pad_crop: int = 0  # random crop of the input size from the image zero-padded by this much
    resized_crop: tuple[float, float] | None = None  # area range of a random resized crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range of that crop
    flip: bool = False  # horizontal flip with probability 1/2
    rotation: float = 0.0  # as keras.layers.RandomRotation(factor): up to +-factor of a full turn
    zoom: float = 0.0  # as keras.layers.RandomZoom(factor): scale in [1 - factor, 1 + factor]
    fill: str = "reflection"  # outside the image after rotation/zoom (Keras fill_mode="reflect")

    @property
    def affine(self) -> bool:
        return self.resized_crop is not None or self.rotation > 0 or self.zoom > 0


POLICIES: dict[str, Policy] = {
    "none": Policy(),
    # Paper section 4.2: "4 pixels are padded on each side, and a 32x32 crop is randomly sampled
    # from the padded image or its horizontal flip."
    "cifar": Policy(pad_crop=4, flip=True),
    # Photos in a folder: random resized crop (Szegedy et al., as torchvision) with a milder area
    # range than ImageNet's 0.08, since these folders are small, plus small rotation and zoom.
    "folder": Policy(resized_crop=(0.35, 1.0), flip=True, rotation=0.05, zoom=0.1),
    # The course material's Keras pipeline: RandomFlip("horizontal"), RandomRotation(0.1),
    # RandomZoom(0.1).
    "keras": Policy(flip=True, rotation=0.1, zoom=0.1),
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ReslabError(f"unknown augmentation {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low


def _flip_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator, *, flip: bool = False
) -> torch.Tensor:
    """Random same-size crop of the zero-padded batch (and optional flip) as one gather, any dtype."""
    n, c, h, w = images.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    if flip:
        flipped = _flip_signs(n, generator) < 0
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    padded = F.pad(images, (padding,) * 4) if padding else images
    # One gather over the flattened padded planes: 5x faster than 4-D advanced indexing here.
    source = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]
    source = source.to(images.device).view(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, source).view(n, c, h, w)


def horizontal_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flipped = (_flip_signs(images.shape[0], generator) < 0).to(images.device)
    return torch.where(flipped[:, None, None, None], images.flip(3), images)


def affine_matrices(n: int, policy: Policy, generator: torch.Generator) -> torch.Tensor:
    """n x 2 x 3 matrices mapping output to input coordinates ([-1, 1], square images)."""
    # Crop of width w and height h (fractions of the side) at centre (cx, cy).
    w = h = torch.ones(n, dtype=torch.float64)
    cx = cy = torch.zeros(n, dtype=torch.float64)
    if policy.resized_crop is not None:
        area = _uniform(n, *policy.resized_crop, generator)
        log_ratio = _uniform(n, math.log(policy.ratio[0]), math.log(policy.ratio[1]), generator)
        # Clamped to the image rather than re-drawn (torchvision tries 10 times, then centre-crops).
        w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        cx = (_uniform(n, -1.0, 1.0, generator)) * (1 - w)
        cy = (_uniform(n, -1.0, 1.0, generator)) * (1 - h)
    angle = _uniform(n, -1.0, 1.0, generator) * policy.rotation * 2 * math.pi
    scale = _uniform(n, 1 - policy.zoom, 1 + policy.zoom, generator)
    flip = _flip_signs(n, generator) if policy.flip else torch.ones(n, dtype=torch.float64)
    cos, sin = angle.cos() * scale, angle.sin() * scale
    theta = torch.stack(
        [
            torch.stack([w * cos * flip, -w * sin, cx], 1),
            torch.stack([h * sin * flip, h * cos, cy], 1),
        ],
        1,
    )
    return theta.float()


def sampling_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(theta, (n, c, height, width), align_corners=False), by broadcasting.

    affine_grid runs a batched matmul over every pixel; three broadcast multiply-adds give the
    same grid several times faster on a CPU.
    """
    device = theta.device
    xs = (torch.arange(width, device=device, dtype=torch.float32) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=device, dtype=torch.float32) * 2 + 1) / height - 1
    t = theta[:, None, None]  # n x 1 x 1 x 2 x 3
    return t[..., 0] * xs[:, None] + t[..., 1] * ys[:, None, None] + t[..., 2]


def augment(images: torch.Tensor, policy: Policy, generator: torch.Generator) -> torch.Tensor:
    """uint8 N x C x H x W batch -> augmented float32 batch, pixel values still in [0, 255]."""
    if policy.pad_crop:
        images = random_crop(images, policy.pad_crop, generator, flip=policy.flip and not policy.affine)
    elif policy.flip and not policy.affine:
        images = horizontal_flip(images, generator)
    images = images.float()
    if policy.affine:
        theta = affine_matrices(images.shape[0], policy, generator).to(images.device)
        grid = sampling_grid(theta, images.shape[2], images.shape[3])
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode=policy.fill, align_corners=False)
    return images
