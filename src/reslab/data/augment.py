"""Augmentation of whole uint8 batches with tensor ops: no per-image Python, no PIL.

Every random draw comes from the `torch.Generator` passed in, on the CPU, so a batch's
augmentation is a pure function of that generator's seed whatever device the pixels are on.
Geometric transforms (resized crop, flip, rotation, zoom, and TrivialAugment's rotate, shear and
translate) are folded into one affine matrix per image and applied with a single `grid_sample`
over the batch; TrivialAugment's colour operations then run once per operation on the images that
drew it. Random erasing and mixup/cutmix act on the normalized batch (`erase`, `mix`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
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
    trivial: bool = False  # TrivialAugment: one of TRIVIAL_OPS per image at a uniform random strength

    @property
    def affine(self) -> bool:
        return self.resized_crop is not None or self.rotation > 0 or self.zoom > 0 or self.trivial


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
    # "folder"'s crop and flip, then TrivialAugment (Mueller and Hutter 2021): photos from scratch
    # (benchmarks/RESULTS.md, "Small photo folders"). No extra rotation or zoom: TA rotates itself.
    "trivial": Policy(resized_crop=(0.35, 1.0), flip=True, trivial=True),
}

# TrivialAugment's operations with the strength range of RandAugment's at magnitude 30 of 30
# (torchvision's TrivialAugmentWide widens them further; photos of a few thousand images from
# scratch want the milder ones). Geometric: the largest angle (degrees), shear or shift (a fraction
# of the side); colour: the largest change of the enhancement factor from 1.
TRIVIAL_OPS = ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness", "color",
               "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
TRIVIAL_MAX = {"rotate": 30.0, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 0.3, "translate_y": 0.3,
               "brightness": 0.9, "color": 0.9, "contrast": 0.9, "sharpness": 0.9}
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
# Random erasing (Zhong et al. 2017): the erased area (fraction of the image) and aspect ratio ranges.
ERASE_AREA, ERASE_RATIO = (0.02, 1 / 3), (0.3, 3.3)


def get_policy(name: str, flip: bool | None = None) -> Policy:
    """The policy `name`, with its horizontal flip forced on or off by `flip` (None: the policy's own).
    Every policy honours it: the flip is a sign in the affine matrix, a reversed gather in the
    padded crop, or a flip of its own where the policy does neither."""
    if name not in POLICIES:
        raise ReslabError(f"unknown augmentation {name!r}; choose one of {', '.join(POLICIES)}")
    policy = POLICIES[name]
    return policy if flip is None else dataclasses.replace(policy, flip=bool(flip))


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


def affine_matrices(n: int, policy: Policy, generator: torch.Generator,
                    trivial: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """n x 2 x 3 matrices mapping output to input coordinates ([-1, 1], square images); `trivial`
    (each image's op index in TRIVIAL_OPS and signed strength in [-1, 1]) adds its geometric op,
    applied to the crop as TrivialAugment applies it to the resized crop."""
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
    if trivial is not None:
        theta = theta @ _trivial_geometry(*trivial)
    return theta.float()


def _trivial_geometry(ops: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """n x 3 x 3 output-to-input maps of each image's geometric TrivialAugment op (identity for the rest)."""
    n = len(ops)
    m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)

    def chose(name):
        return ops == TRIVIAL_OPS.index(name)

    angle = torch.where(chose("rotate"), strength * math.radians(TRIVIAL_MAX["rotate"]), 0.0)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    m[:, 0, 1] += torch.where(chose("shear_x"), strength * TRIVIAL_MAX["shear_x"], 0.0)
    m[:, 1, 0] += torch.where(chose("shear_y"), strength * TRIVIAL_MAX["shear_y"], 0.0)
    # A shift of f of the side is 2f in [-1, 1] coordinates.
    m[:, 0, 2] = torch.where(chose("translate_x"), 2 * strength * TRIVIAL_MAX["translate_x"], 0.0)
    m[:, 1, 2] = torch.where(chose("translate_y"), 2 * strength * TRIVIAL_MAX["translate_y"], 0.0)
    return m[:, :, :3]


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
    trivial = None
    if policy.trivial:
        n = images.shape[0]
        ops = torch.randint(len(TRIVIAL_OPS), (n,), generator=generator)
        # The geometric ops and the enhancements go either way from neutral; the sign is drawn too.
        trivial = ops, _uniform(n, 0.0, 1.0, generator) * _flip_signs(n, generator)
    if policy.pad_crop:
        images = random_crop(images, policy.pad_crop, generator, flip=policy.flip and not policy.affine)
    elif policy.flip and not policy.affine:
        images = horizontal_flip(images, generator)
    images = images.float()
    if policy.affine:
        theta = affine_matrices(images.shape[0], policy, generator, trivial).to(images.device)
        grid = sampling_grid(theta, images.shape[2], images.shape[3])
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode=policy.fill, align_corners=False)
    if trivial is not None:
        images = trivial_colour(images, *trivial)
    return images


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as PIL's convert("L"); one channel stays itself."""
    if x.shape[1] != 3:
        return x[:, :1]
    return (x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (the kernel ImageEnhance.Sharpness blends against), border pixels kept."""
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13
    c = x.shape[1]
    inner = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per image and channel, on the rounded pixel values."""
    n, c, h, w = x.shape
    levels = x.round().clamp(0, 255).long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    last = hist.gather(1, (hist > 0).float().cumsum(1).argmax(1, keepdim=True))  # count of the brightest level
    step = ((h * w - last) / 255).floor()
    lut = (hist.cumsum(1) - hist + (step / 2).floor()).div(step.clamp_min(1)).floor().clamp(0, 255)
    out = lut.gather(1, levels).float()
    # PIL leaves a channel with a single level (step 0) as it is.
    out = torch.where(step > 0, out, levels.float())
    return out.reshape(n, c, h, w)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    low = x.amin((2, 3), keepdim=True)
    high = x.amax((2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) * 255 / span.clamp_min(1e-6), x)


def _degenerate(name: str, x: torch.Tensor) -> torch.Tensor:
    """The image an ImageEnhance operation blends against: black, grey, the mean grey, or blurred."""
    if name == "brightness":
        return torch.zeros_like(x)
    if name == "color":
        return _grey(x).expand_as(x)
    if name == "contrast":
        return _grey(x).mean((1, 2, 3), keepdim=True).expand_as(x)
    return _blur(x)


def trivial_colour(images: torch.Tensor, ops: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Each image's colour op of TrivialAugment on a float [0, 255] batch (geometric ops and identity
    leave it alone: `affine_matrices` did them)."""
    out = images
    for k, name in enumerate(TRIVIAL_OPS):
        chosen = torch.nonzero(ops == k).flatten()
        if name in _GEOMETRIC or name == "identity" or len(chosen) == 0:
            continue
        x = images[chosen.to(images.device)]
        s = strength[chosen].to(device=images.device, dtype=images.dtype)[:, None, None, None]
        if name in ("brightness", "color", "contrast", "sharpness"):
            # ImageEnhance: blend with a degenerate image, factor 1 + s (below 1 towards it).
            degenerate = _degenerate(name, x)
            x = degenerate + (1 + s * TRIVIAL_MAX[name]) * (x - degenerate)
        elif name == "posterize":  # keep 4 to 8 bits
            shift = 2.0 ** (4 * s.abs()).round()
            x = (x.round() / shift).floor() * shift
        elif name == "solarize":  # invert every pixel above a threshold from 256 down to 0
            x = torch.where(x >= 256 * (1 - s.abs()), 255 - x, x)
        elif name == "autocontrast":
            x = _autocontrast(x)
        elif name == "equalize":
            x = _equalize(x)
        if out is images:
            out = images.clone()
        out[chosen.to(images.device)] = x.clamp(0, 255)
    return out


def erase(x: torch.Tensor, probability: float, generator: torch.Generator, value: float = 0.0) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017): with `probability`, one rectangle of each image (2% to a
    third of its area, aspect ratio 0.3 to 3.3) set to `value` (0: the mean, on a normalized batch)."""
    n, _, h, w = x.shape
    area = _uniform(n, *ERASE_AREA, generator) * h * w
    log_ratio = _uniform(n, math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), generator)
    eh = (area * log_ratio.exp()).sqrt().round().clamp(1, h)
    ew = (area / log_ratio.exp()).sqrt().round().clamp(1, w)
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (w - ew + 1)).floor()
    chosen = torch.rand(n, generator=generator) < probability
    rows = torch.arange(h, dtype=torch.float64)
    cols = torch.arange(w, dtype=torch.float64)
    inside = ((rows >= top[:, None]) & (rows < (top + eh)[:, None]))[:, :, None] & \
        ((cols >= left[:, None]) & (cols < (left + ew)[:, None]))[:, None, :]
    mask = (inside & chosen[:, None, None]).to(x.device)[:, None]
    return x.masked_fill(mask, value)


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, mixup: float, cutmix: float,
        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of the batch with itself reversed, one
    of them per batch (each with probability 1/2 when both are on, as timm), at lambda ~ Beta(alpha,
    alpha); returns the mixed batch and soft targets (N x num_classes)."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(1, generator=generator) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    # torch's Beta sampler takes no generator; a numpy one seeded from ours keeps the draw a pure
    # function of the batch's generator.
    seed = int(torch.randint(2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    other = x.flip(0)
    if use_cutmix:
        h, w = x.shape[2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = (int(v) for v in torch.randint(1 << 30, (2,), generator=generator))
        cy, cx = cy % h, cx % w
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[:, :, top:bottom, left:right] = other[:, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)  # the box clipped at the border
    else:
        x = x * lam + other * (1 - lam)
    target = F.one_hot(y, num_classes).float()
    return x, target * lam + target.flip(0) * (1 - lam)
