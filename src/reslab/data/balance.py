"""Imbalanced folders: a warning at the start, class-weighted loss, a balanced sampler, and best
weights chosen by balanced accuracy.

A folder of 900 cats and 90 dogs trains without complaint to a model that calls everything a cat
and scores 0.91: plain accuracy rewards the majority. What the trainer does about it:

- `imbalance_lines`: the start of `reslab train` says so when the largest class of the training
  split has at least IMBALANCE_RATIO times the images of the smallest, and names both options;
- `--class-weights balanced` (`criterion`): each class's loss weighted by n / (k * n_c), scikit-learn's
  `compute_class_weight("balanced")` (King and Zeng 2001; Keras' `class_weight`), so every class
  carries the same total weight;
- `--sampler balanced` (`BalancedBatchLoader`): each epoch is len(split) draws with replacement, an
  example drawn with probability proportional to 1 / n_c (torch's WeightedRandomSampler, timm's and
  fastai's balanced samplers), so a batch holds each class about equally often. The draw is a pure
  function of (seed, epoch), as the shuffled order it replaces, so a resumed epoch draws the same
  indices, and under DDP every rank takes its shard of the same draw (BatchLoader.indices);
- with either on, the best weights (and early stopping) follow the validation split's balanced
  accuracy, the mean recall over classes, instead of its plain accuracy (`selection_metric`).

`scores` gives balanced accuracy and macro F1 from a confusion matrix exactly as eval.json computes
them from predictions (reslab.evaluate), so the trainer can sum the matrix over ranks first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from reslab.data.loader import BatchLoader, _generator
from reslab.errors import ReslabError

BALANCE_OPTIONS = ("none", "balanced")  # the values of --class-weights and --sampler
# The largest class this many times the smallest: the start line warns (a 10:1 folder trains to a
# majority-class model unless told otherwise; 2:1 or 3:1 seldom needs help).
IMBALANCE_RATIO = 5
_DRAW = 2  # the balanced draw's random stream (reslab.data.loader uses 0 and 1)


def check_options(class_weights: str | None, sampler: str | None) -> None:
    for flag, value in (("--class-weights", class_weights), ("--sampler", sampler)):
        if value is not None and value not in BALANCE_OPTIONS:
            raise ReslabError(f"{flag} must be balanced or none, got {value!r}")


def is_balancing(cfg) -> bool:
    """Whether a (resolved) TrainConfig corrects for imbalance: --class-weights or --sampler balanced."""
    return "balanced" in (cfg.class_weights, cfg.sampler)


def selection_metric(cfg) -> str:
    """The validation score the best weights and early stopping follow: "balanced_accuracy" when the
    run corrects for imbalance (a majority-class model must not win), else "acc"."""
    return "balanced_accuracy" if is_balancing(cfg) else "acc"


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def imbalance_lines(classes: Sequence[str], labels: torch.Tensor, cfg) -> list[str]:
    """The start line on an imbalanced training split (largest class >= IMBALANCE_RATIO x smallest):
    the two classes with their counts and what to do; nothing for a balanced one."""
    counts = class_counts(labels, len(classes))
    if len(counts) < 2:
        return []
    big, small = int(np.argmax(counts)), int(np.argmin(counts))
    if counts[big] < IMBALANCE_RATIO * counts[small]:
        return []
    ratio = f"{counts[big] / counts[small]:.1f}x" if counts[small] else "no images of the smallest"
    found = (f"imbalanced training split: {classes[big]!r} has {counts[big]} images, {classes[small]!r} "
             f"{counts[small]} ({ratio})")
    if is_balancing(cfg):
        on = [f"--{k.replace('_', '-')} balanced" for k in ("class_weights", "sampler")
              if getattr(cfg, k) == "balanced"]
        return [f"{found}; {' and '.join(on)} {'is' if len(on) == 1 else 'are'} on, and the best weights are chosen "
                "by balanced accuracy"]
    return [f"{found}: plain accuracy rewards predicting {classes[big]!r}; consider --class-weights balanced "
            "or --sampler balanced (README, \"Imbalanced folders\")"]


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n / (k * n_c) per class (scikit-learn's compute_class_weight("balanced")), k the classes the
    split has; a class with no training image gets weight 0 (no example ever carries it)."""
    from sklearn.utils.class_weight import compute_class_weight

    y = labels.numpy()
    present = np.unique(y)
    weights = np.zeros(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=y)
    return torch.tensor(weights, dtype=torch.float32)


def criterion(cfg, labels: torch.Tensor, num_classes: int, device: torch.device) -> torch.nn.CrossEntropyLoss:
    """The training loss: cross-entropy with the config's label smoothing, class-weighted with
    --class-weights balanced (weights from the training split's labels)."""
    weight = balanced_class_weights(labels, num_classes).to(device) if cfg.class_weights == "balanced" else None
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def draw_weights(labels: torch.Tensor) -> torch.Tensor:
    """Each example's draw weight, 1 / (its class's count): every class is drawn equally often."""
    counts = torch.bincount(labels).double()
    return 1.0 / counts[labels]


class BalancedBatchLoader(BatchLoader):
    """A BatchLoader whose epoch order is a class-balanced draw with replacement (see the module
    docstring) instead of a permutation: the same length, padding, sharding and augmentation."""

    def __init__(self, split, batch_size: int, **options):
        super().__init__(split, batch_size, **options)
        self.weights = draw_weights(split.labels)

    def order(self) -> torch.Tensor:
        generator = _generator(self.seed, self.epoch, _DRAW)
        return torch.multinomial(self.weights, len(self.split), replacement=True, generator=generator)


def loader_class(sampler: str | None) -> type[BatchLoader]:
    """The training loader for --sampler."""
    return BalancedBatchLoader if sampler == "balanced" else BatchLoader


def scores(confusion: Sequence[float] | np.ndarray, num_classes: int) -> dict[str, float | None]:
    """{"balanced_accuracy", "macro_f1"} of a confusion matrix (rows true class, columns predicted;
    flat or square), computed as eval.json computes them (reslab.evaluate: scikit-learn, over the
    classes the data has) from the predictions the matrix counts."""
    from reslab.evaluate import _averages

    matrix = np.rint(np.asarray(confusion, dtype=np.float64)).astype(np.int64).reshape(num_classes, num_classes)
    y_true, y_pred = np.divmod(np.repeat(np.arange(num_classes**2), matrix.ravel()), num_classes)
    averages = _averages(y_true, y_pred, np.flatnonzero(matrix.sum(1)).tolist())
    return {"balanced_accuracy": averages["balanced_accuracy"], "macro_f1": averages["macro_f1"]}
