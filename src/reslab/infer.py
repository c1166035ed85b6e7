"""Inference: a trained model as a function from images to class probabilities.

`Predictor` is what `reslab predict`, `evaluate`, `explain` and `serve` call. It owns the
preprocessing stored in the checkpoint, so an image of any size or mode is treated as in training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from reslab.checkpoint import CheckpointMeta, load_model


def normalizer(mean: Sequence[float], std: Sequence[float], channels: int):
    """uint8 [0, 255] batch -> float (x/255 - mean)/std, as one multiply-add."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).expand(channels)[:, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32).expand(channels)[:, None, None]
    scale, shift = 1.0 / (255.0 * std_t), -mean_t / std_t

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(shift.to(images.device), images.float(), scale.to(images.device))

    return normalize


class Predictor:
    """Class probabilities for images, from a run directory or reslab weights file."""

    def __init__(self, source: str | os.PathLike, *, device: str = "cpu"):
        self.model, self.meta = load_model(source, device=device)
        self.device = torch.device(device)
        pre = self.meta.preprocessing
        self.preprocessing = pre
        self.classes = self.meta.classes
        self.normalize = normalizer(pre.get("mean", (0.0,)), pre.get("std", (1.0,)), pre.get("in_channels", 3))

    @classmethod
    def from_model(cls, model: nn.Module, meta: CheckpointMeta, device: str = "cpu") -> Predictor:
        self = cls.__new__(cls)
        self.model, self.meta, self.device = model.to(device).eval(), meta, torch.device(device)
        self.preprocessing, self.classes = meta.preprocessing, meta.classes
        pre = meta.preprocessing
        self.normalize = normalizer(pre.get("mean", (0.0,)), pre.get("std", (1.0,)), pre.get("in_channels", 3))
        return self

    def load_images(self, images) -> torch.Tensor:
        """Paths or PIL images -> one uint8 batch, preprocessed as in training."""
        from reslab.data import preprocess_image

        return torch.stack([preprocess_image(img, **self.preprocessing) for img in images])

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 N x C x H x W batch -> float32 logits N x num_classes."""
        out = []
        for start in range(0, len(batch), batch_size):
            x = self.normalize(batch[start : start + batch_size].to(self.device))
            out.append(self.model(x).float())
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(batch), dim=1)

    def predict(self, images, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (class name, probability) for each image (paths or PIL images)."""
        probs = self.probabilities(self.load_images(images))
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        return [
            [(self.classes[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)
        ]
