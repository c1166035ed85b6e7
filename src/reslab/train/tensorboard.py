"""`reslab train --log tensorboard`: the run as TensorBoard event files, beside metrics.csv.

`tensorboard --logdir runs` then shows every run. Written by rank 0 only. One x axis for every
scalar and image: the global step (steps done, 1-based), as Lightning logs them, so that the
per-epoch values sit at their epoch's last step and TensorBoard's purge works on one axis.

- `train/loss_step`: the loss of every SYNC_EVERY-th step (the loop's host syncs, so no extra wait)
- `train/loss`, `train/acc`, `val/loss`, `val/acc` (and `ema_val/*`), `lr`, `epoch`: per epoch
- `curves`: curves.png whenever the loop draws it; `samples`: a grid of validation images with the
  final model's predictions (plots.samples), when the run stops

A resumed run never writes a step twice: the writer opens with `purge_step` = the checkpoint's step
+ 1, so whatever a killed process wrote after its last checkpoint is dropped by TensorBoard (a run
taken over before its first checkpoint purges from step 1).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from reslab.errors import ReslabError

LOGS = ("tensorboard",)
SAMPLE_COUNT = 32


def check_log(log: str | None) -> None:
    """`--log` is None or "tensorboard", whose package is installed (checked before any training)."""
    if log is None:
        return
    if log not in LOGS:
        raise ReslabError(f"--log must be {' or '.join(LOGS)}, got {log!r}")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ReslabError("--log tensorboard needs the tensorboard package: "
                          "pip install 'reslab[tensorboard]'") from None


class EventLog:
    """A SummaryWriter on the run directory, with what the loop records."""

    def __init__(self, run_dir: Path, done_steps: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=done_steps + 1)

    def step_loss(self, step: int, loss: torch.Tensor) -> None:
        self.writer.add_scalar("train/loss_step", float(loss), step)

    def epoch(self, row, step: int, curves: Path | None) -> None:
        """An EpochRow (reslab.train.state) at the epoch's last step; curves.png if it was redrawn."""
        scalars = {"train/loss": row.train_loss, "train/acc": row.train_acc, "val/loss": row.val_loss,
                   "val/acc": row.val_acc, "ema_val/loss": row.ema_val_loss, "ema_val/acc": row.ema_val_acc,
                   "lr": row.lr, "epoch": row.epoch}
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        if curves is not None:
            self.image("curves", curves, step)
        self.writer.flush()  # a TensorBoard watching the run sees each epoch as it ends

    def image(self, tag: str, png: Path, step: int) -> None:
        from PIL import Image

        with Image.open(png) as picture:
            self.writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")

    def samples(self, model: torch.nn.Module, loader, classes: list[str], step: int) -> None:
        """Up to SAMPLE_COUNT images of `loader`'s split, evenly spread, with `model`'s predictions."""
        from reslab import plots

        split = loader.split
        pick = torch.linspace(0, len(split) - 1, min(SAMPLE_COUNT, len(split))).round().long().unique()
        images = split.images[pick]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            x = loader.transform(images.to(loader.device), torch.Generator(loader.device))
            probabilities = model(x).float().softmax(1).cpu()
        model.train(was_training)
        confidence, predicted = probabilities.max(1)
        with tempfile.TemporaryDirectory() as tmp:
            png = plots.samples(Path(tmp) / "samples.png", images.numpy(), split.labels[pick].tolist(),
                                predicted.tolist(), classes, probabilities=confidence.tolist())
            self.image("samples", png, step)

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def event_log(log: str | None, run_dir: Path, done_steps: int, is_main: bool) -> Iterator[EventLog | None]:
    """The run's EventLog on rank 0 with `--log tensorboard`, closed when training ends; else None."""
    if log is None or not is_main:
        yield None
        return
    events = EventLog(run_dir, done_steps)
    try:
        yield events
    finally:
        events.close()
