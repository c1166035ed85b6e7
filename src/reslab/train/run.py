"""A training run as the loop holds it: what `reslab.train.loop._setup` builds once for the epochs.

The loop (loop.py), the budget's plan and measurements (budget.py) and the run's files
(records.py) all work on a `Run`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.checkpoint import CheckpointMeta
from reslab.train.config import TrainConfig
from reslab.train.distributed import DistContext
from reslab.train.schedule import lr_multiplier, set_lr
from reslab.train.state import Progress
from reslab.train.steps import WeightEMA


@dataclass
class BudgetClock:
    """When a --budget run's process started, and when its first epoch began (a budget plans only a
    new run: a resumed one keeps its plan and has no clock)."""

    started: float
    epochs_started: float | None = None


@dataclass
class Run:
    """What `_setup` builds once for the epochs."""

    cfg: TrainConfig
    ctx: DistContext
    dir: Path
    progress: Progress
    model: nn.Module  # the bare model: what checkpoints hold
    train_model: nn.Module  # `model` as trained: under DDP and torch.compile when asked
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable  # the criterion `step` uses (class-weighted with --class-weights balanced)
    loader: Any  # reslab.data.BatchLoader, this rank's share of every batch
    val_loader: Any | None
    test_loader: Any | None
    device: torch.device
    precision: str
    channels_last: bool
    weights_meta: dict  # what every weights file says about itself (CheckpointMeta fields)
    ema: WeightEMA | None = None
    record: dict = dataclasses.field(default_factory=dict)  # config.json's content besides the config
    budget: dict | None = None  # how a --budget run chose its epochs (config.json's "budget")
    budget_clock: BudgetClock | None = None  # a --budget run's clock, for its re-plans (not on resume)
    curves_drawn: float | None = None  # reslab.train.budget.clock() when curves.png was last drawn
    log: Any = None  # reslab.train.tensorboard.EventLog: rank 0 with --log tensorboard

    def set_lr(self, step: int) -> float:
        """The lr of global step `step` (0-based) set on the optimizer; returns the first group's.

        With head epochs (the finetune recipe) the schedule starts after them; during them only the
        head trains, on a cosine from its base lr."""
        steps, cfg = len(self.loader), self.cfg
        head = cfg.head_epochs * steps
        if step < head:
            return set_lr(self.optimizer, lr_multiplier("cosine", step, head))
        warmup = round(cfg.warmup_epochs * steps)
        total = (cfg.epochs - 1) * steps + self.epoch_steps(cfg.epochs - 1)
        return set_lr(self.optimizer, lr_multiplier(cfg.schedule, step - head, total - head, warmup))

    def epoch_steps(self, epoch: int) -> int:
        """The optimizer steps of epoch `epoch` (0-based): the loader's batches, but a --budget plan may
        shorten its last epoch to the steps that fit (budget "last_epoch_steps"; a run given more
        --epochs on resume trains whole epochs)."""
        steps, planned = len(self.loader), self.budget or {}
        if epoch == self.cfg.epochs - 1 and planned.get("epochs") == self.cfg.epochs:
            return min(steps, planned.get("last_epoch_steps") or steps)
        return steps

    def set_phase(self, epoch: int) -> None:
        """The finetune recipe's phases, a pure function of the epoch (so resume is exact): the body
        frozen, BatchNorm included, for the head epochs; then what --freeze says (default: nothing)."""
        if self.cfg.head_epochs:
            from reslab.transfer import freeze

            freeze(self.model, "all-but-head" if epoch < self.cfg.head_epochs else self.cfg.freeze or "none")

    def meta(self, epoch: int, val_acc: float | None, weights: str = "model") -> CheckpointMeta:
        # "flip": whether training mirrored the images; a model that never saw a mirror image is never
        # flipped at test time by default (reslab.inference.predictor.resolve_tta).
        extra = {"epoch": epoch, "val_acc": val_acc, "data": self.cfg.data, "seed": self.cfg.seed,
                 "val_split": self.cfg.val_split, "run": self.dir.name, "flip": self.record.get("flip")}
        if self.ema is not None:
            extra["weights"] = weights  # "ema": the exponential moving average of the weights
        return CheckpointMeta(**self.weights_meta, extra=extra)
