"""The embedded default: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels, 10 classes).

It ships with scikit-learn, so `reslab train` works offline with no download.
"""

from __future__ import annotations

import numpy as np
import torch

from reslab.data.bundle import DataBundle, Split, channel_stats, check_fits, resize_images, stratified_split

# Held-out shares of the whole set when no --val-split is given: 70/10/20 train/val/test.
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


def load_digits(*, image_size: int | None, val_split: float | None, seed: int) -> DataBundle:
    """Digits split train/val/test, stratified and seeded by `seed` (same seed, same split).

    The test share is always 20%; `val_split` is the fraction of the remaining 80% held out for
    validation (default 0.125, i.e. 10% of the whole set).
    """
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    # 0..16 grey levels -> 0..255, so the images look like any other 8-bit image to the pipeline.
    images = np.rint(raw.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = raw.target.astype(np.int64)
    rest, test = stratified_split(labels, TEST_FRACTION, seed)
    if val_split is None:
        val_split = VAL_FRACTION / (1.0 - TEST_FRACTION)
    train_in_rest, val_in_rest = stratified_split(labels[rest], val_split, seed + 1)
    train, val = rest[train_in_rest], rest[val_in_rest]

    size = image_size or 8
    check_fits("digits", len(images), 1, size)
    all_images = resize_images(torch.from_numpy(images), size)
    all_labels = torch.from_numpy(labels)

    def part(index):
        return Split(all_images[index].contiguous(), all_labels[index].clone()) if len(index) else None

    train_split = part(train)
    mean, std = channel_stats(train_split.images)
    return DataBundle(
        name="digits",
        classes=[str(d) for d in range(10)],
        train=train_split,
        val=part(val),
        test=part(test),
        in_channels=1,
        image_size=size,
        mean=mean,
        std=std,
        augment="none",
        source={
            "kind": "digits",
            "origin": "sklearn.datasets.load_digits",
            "seed": seed,
            "val_split": val_split,
            "test_fraction": TEST_FRACTION,
            "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        },
        resize="squash",
    )
