"""The degradation problem (paper section 4.1-4.2, Figure 6): deeper plain nets train worse.

A plain and a residual net of each depth are trained through `reslab.train` with one recipe and
one seed, so the shortcuts are the only difference. The paper's claim is about *training*
error: the deeper plain net is worse on the data it is fitted to, so the cause is optimization,
not overfitting; with shortcuts the deeper net is at least as good.

On CIFAR-10 (`data="cifar10"`, a CIFAR archive or a folder of CIFAR-sized images) the curves are
drawn against iterations, as the paper's Figure 6; the bold one is the validation error (the
trainer evaluates the validation split every epoch and the test split only once, at the end), so
CIFAR data holds out the paper's 45k/5k split unless `val_split` says otherwise. A killed
experiment continues with `resume` (`DegradationConfig.resumed`): finished nets are read back, a
half-trained one continues from its last checkpoint.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reslab.errors import ReslabError
from reslab.experiments.common import (
    ERROR_DEFINITIONS,
    check_epochs,
    check_jobs,
    claim_experiment_dir,
    default_image_size,
    model_depth,
    resumed_config,
    shared_train_config,
    steps_per_epoch,
    train_nets,
)
from reslab.io import write_csv, write_json
from reslab.models import get_model_spec

METRIC_COLUMNS = ("model", "depth", "residual", "epoch", "iteration", "lr", "train_loss", "train_error", "val_loss",
                  "val_error", "seconds")
# steps.csv: each net's training loss and error within epochs (the trainer's steps.csv), by iteration.
STEP_COLUMNS = ("model", "depth", "residual", "iteration", "epoch", "train_loss", "train_error")


# Peak of the fast recipe's one-cycle schedule. 0.05, not the paper's 0.1: as for its 110-layer net
# (section 4.2, "0.1 is slightly too large to start converging"), resnet56 on the 1,259 digits (10
# steps an epoch) diverged at the peak of 0.1 (23% final training error, seed 0); at 0.05 it trains.
FAST_LR = 0.05
# The paper's 45k/5k split of CIFAR-10's training set (section 4.2).
CIFAR_VAL_SPLIT = 0.1
# Default schedule lengths. On CIFAR-10 the four default nets' epochs take about 15 minutes on 2
# CPU cores in fp32, and plain56 stays far above plain20 and resnet56 far below plain56 in training
# error from the first epoch on (docs/experiments.md, "On CIFAR-10"): 2 epochs show it within 45
# minutes. The digits' 1,259 training images take 8.
DIGITS_EPOCHS, CIFAR_EPOCHS = 8, 2


@dataclass
class DegradationConfig:
    data: str = "digits"
    depths: list[int] = field(default_factory=lambda: [20, 56])
    epochs: int | None = None  # None: DIGITS_EPOCHS on the digits, CIFAR_EPOCHS on CIFAR data and folders
    batch_size: int = 128  # the paper's batch (section 4.2)
    lr: float | None = None  # None: FAST_LR with the fast recipe, the recipe's own (0.1) with the paper's
    recipe: str = "fast"
    # None: the paper's 45k/5k (0.1) on CIFAR data and image folders, so that the bold curve exists;
    # the digits' own split.
    val_split: float | None = None
    image_size: int | None = None  # None: 8 for digits, else the CIFAR nets' native 32
    seed: int = 0
    precision: str = "auto"
    out: str | None = None
    resume: str | None = None  # an earlier experiment's folder to continue (see `resumed`)
    quiet: bool = False
    jobs: int = 1  # nets trained at once, side by side (reslab.experiments.parallel)

    def __post_init__(self):
        self.depths = list(self.depths)
        if not self.depths:
            raise ReslabError("--depths needs at least one depth, e.g. --depths 20 56")
        if len(set(self.depths)) != len(self.depths):
            raise ReslabError(f"--depths lists a depth twice: {' '.join(map(str, self.depths))}")
        for depth in self.depths:
            if isinstance(depth, bool) or not isinstance(depth, int):
                raise ReslabError(f"--depths takes integers, got {depth!r}")
            get_model_spec(f"plain{depth}")  # a depth that is not 6n+2 is refused here, with the reason
        if self.epochs is not None:
            check_epochs(self.epochs)
        check_jobs(self.jobs)

    @classmethod
    def resumed(cls, folder: str, **given) -> DegradationConfig:
        """The experiment saved in `folder`, to continue; `given` options must match its settings."""
        return resumed_config(cls, folder, "degradation", given)

    @property
    def models(self) -> list[str]:
        return [f"{kind}{depth}" for depth in sorted(self.depths) for kind in ("plain", "resnet")]

    def resolved_epochs(self) -> int:
        return self.epochs or (DIGITS_EPOCHS if self.data == "digits" else CIFAR_EPOCHS)

    def resolved_image_size(self) -> int:
        return self.image_size or default_image_size(self.data)

    def resolved_lr(self) -> float | None:
        return self.lr if self.lr is not None else (FAST_LR if self.recipe == "fast" else None)

    def resolved_val_split(self) -> float | None:
        if self.val_split is None and self.data != "digits":
            return CIFAR_VAL_SPLIT
        return self.val_split

    def resolved_augment(self) -> str | None:
        """The paper's flip and 4-pixel pad-and-crop (section 4.2) on every data but the digits (their
        own policy): a folder of CIFAR images trains as the CIFAR archive does, not as photos."""
        return None if self.data == "digits" else "cifar"

    def train_config(self, model: str, out: Path):
        from reslab.train import TrainConfig

        return TrainConfig(model=model, data=self.data, epochs=self.resolved_epochs(), batch_size=self.batch_size,
                           lr=self.resolved_lr(), recipe=self.recipe, val_split=self.resolved_val_split(),
                           augment=self.resolved_augment(),
                           image_size=self.resolved_image_size(), seed=self.seed, precision=self.precision,
                           out=os.fspath(out / model), quiet=self.quiet)


def run_degradation(config: DegradationConfig, progress=None, stop=None) -> dict:
    """Train every net of `config` into `out/<model>/`; write summary.json, metrics.csv, degradation.png.

    `stop(model, epoch, step)`: the trainer's stop hook for each net (as Ctrl-C: the net checkpoints
    and the experiment ends with a ReslabError naming --resume)."""
    from reslab import plots
    from reslab.data import load_data

    for name in config.models:  # impossible settings are refused before the folder is claimed
        config.train_config(name, Path(".")).resolve()
    # The trainer's own split of the data (same seed), for the clean pass over the training set.
    data = load_data(config.data, image_size=config.resolved_image_size(), val_split=config.resolved_val_split(),
                     seed=config.seed, quiet=True)
    out = claim_experiment_dir(config, "degradation")
    train_configs = {name: config.train_config(name, out).resolve() for name in config.models}
    iterations = steps_per_epoch(len(data.train), config.batch_size)
    models, curves, rows, step_rows = {}, {}, [], []
    started = time.perf_counter()
    for net in train_nets(train_configs, progress, resume=config.resume, stop=stop, jobs=config.jobs):
        depth, residual = model_depth(net.name), get_model_spec(net.name).residual
        models[net.name] = {"depth": depth, "residual": residual, **net.errors(data)}
        epochs = [int(m["epoch"]) for m in net.metrics]
        curves[net.name] = {"depth": depth, "residual": residual, "epoch": epochs,
                            "iteration": [e * iterations for e in epochs],
                            "train_error": net.train_errors, "val_error": net.val_errors,
                            "steps": {"iteration": [int(s["step"]) for s in net.steps],
                                      "train_error": [1 - s["train_acc"] for s in net.steps]}}
        step_rows += [[net.name, depth, int(residual), int(s["step"]), s["epoch"], s["train_loss"], 1 - s["train_acc"]]
                      for s in net.steps]
        rows += [[*row[:4], row[3] * iterations, *row[4:]] for row in net.metric_rows(net.name, depth, int(residual))]
    summary = {
        "experiment": "degradation",
        "models": models,
        "settings": {**asdict(config), "out": os.fspath(out), "image_size": config.resolved_image_size(),
                     "lr": config.resolved_lr(), "val_split": config.resolved_val_split(),
                     "epochs": config.resolved_epochs(),
                     "iterations_per_epoch": iterations, "train_config": shared_train_config(train_configs)},
        "definitions": {
            "final_train_error": "last epoch's training error as logged: running average over the epoch, "
                                 "train mode (what the paper's Figure 6 plots)",
            **ERROR_DEFINITIONS,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_csv(out / "metrics.csv", METRIC_COLUMNS, rows)
    write_csv(out / "steps.csv", STEP_COLUMNS, step_rows)
    write_json(out / "summary.json", summary)
    plots.degradation(curves, out / "degradation.png")
    return summary
