"""Turning one image file, of any format and mode, into the uint8 tensor the network was trained on.

`preprocess_image` is the single path used by folder loading, `reslab predict` and the server,
so an image seen at prediction time is converted exactly as the training images were.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from reslab.data.bundle import RESIZE_MODES
from reslab.errors import ReslabError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_FORMATS = "JPEG, PNG, BMP, GIF, WebP or TIFF"  # the same, for messages

# JPEG's DCT can decode at 1/2, 1/4 or 1/8 scale almost for free; only worth it when the target is
# at most half the stored size (draft never goes below the requested size).
_DRAFT_FACTOR = 2

# Transparent pixels become white: the colour a transparent logo or sticker shows on a page.
_BACKGROUND = (255, 255, 255)


def check_preprocessing(image_size: int, in_channels: int, resize: str) -> None:
    if resize not in RESIZE_MODES:
        raise ReslabError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if in_channels not in (1, 3):
        raise ReslabError(f"in_channels must be 1 or 3, got {in_channels!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ReslabError(f"image_size must be a positive integer, got {image_size!r}")


def _to_mode(img: Image.Image, in_channels: int) -> Image.Image:
    """Any PIL mode to "L" (1 channel) or "RGB" (3 channels), consistently for every format."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit (and 32-bit) greyscale: PIL's convert("L") clips at 255 instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if (img.mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            peak = 1.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    target = "L" if in_channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _fit(img: Image.Image, image_size: int, resize: str, resize_size: int | None = None,
         interpolation: str = "bilinear") -> Image.Image:
    """The image at image_size x image_size. center_crop: the centre square of the shorter side, or
    with `resize_size`, the centre image_size crop after resizing the shorter side to resize_size
    (torchvision's and timm's evaluation: Resize(resize_size) then CenterCrop(image_size))."""
    width, height = img.size
    box = None
    if resize == "center_crop" and (width != height or (resize_size or image_size) != image_size):
        side = min(width, height) * image_size / (resize_size or image_size)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
    if box is None and (width, height) == (image_size, image_size):
        return img
    # Resizing and cropping in one call lets PIL filter from the full-resolution pixels.
    return img.resize((image_size, image_size), _FILTERS.get(interpolation, Image.Resampling.BILINEAR), box=box)


def decode_image(
    img: Image.Image | str | os.PathLike, image_size: int, in_channels: int, resize: str = "center_crop",
    resize_size: int | None = None, interpolation: str = "bilinear",
) -> np.ndarray:
    """uint8 C x H x W numpy array; a bad file raises PIL's own errors (OSError, ValueError...)."""
    check_preprocessing(image_size, in_channels, resize)
    if isinstance(img, (str, os.PathLike)):
        with Image.open(Path(img)) as opened:
            return decode_image(opened, image_size, in_channels, resize, resize_size, interpolation)
    scale_to = max(image_size, resize_size or 0)
    if img.format == "JPEG" and min(img.size) >= _DRAFT_FACTOR * scale_to:
        # Draft keeps both sides >= the request, so the shorter side still covers the resize.
        img.draft("L" if in_channels == 1 else "RGB", (scale_to, scale_to))
    ImageOps.exif_transpose(img, in_place=True)
    img = _fit(_to_mode(img, in_channels), image_size, resize, resize_size, interpolation)
    arr = np.asarray(img, dtype=np.uint8)
    arr = np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    # PIL's buffer is read-only; torch wants to own writable memory.
    return arr if arr.flags.writeable else arr.copy()


def preprocess_image(
    img: Image.Image | str | os.PathLike,
    *,
    image_size: int,
    in_channels: int,
    resize: str = "center_crop",
    resize_size: int | None = None,
    interpolation: str = "bilinear",
    **ignored,
):
    """An image (PIL image or path) as a uint8 C x H x W tensor, exactly as training saw it.

    Call it with a checkpoint's `preprocessing()` dict; the normalization keys in it (mean, std)
    are applied later, to the float batch, and ignored here.
    """
    import torch

    if isinstance(img, (str, os.PathLike)) and not Path(img).is_file():
        raise ReslabError(f"image not found: {img}; give the path of an existing image file")
    try:
        array = decode_image(img, image_size, in_channels, resize, resize_size, interpolation)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ReslabError(
            f"cannot read {img} as an image ({err}); give a {IMAGE_FORMATS} file"
        ) from None
    return torch.from_numpy(array)
