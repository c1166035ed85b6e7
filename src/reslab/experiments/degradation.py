"""The degradation problem (paper section 4.1-4.2, Figure 6): deeper plain nets train worse.

A plain and a residual net of each depth are trained through `reslab.train` with one recipe and
one seed, so the shortcuts are the only difference. The paper's claim is about *training*
error: the deeper plain net is worse on the data it is fitted to, so the cause is optimization,
not overfitting; with shortcuts the deeper net is at least as good.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reslab.errors import ReslabError
from reslab.experiments.common import (
    ERROR_DEFINITIONS,
    default_image_size,
    default_out,
    model_depth,
    shared_train_config,
    train_nets,
)
from reslab.io import write_csv, write_json
from reslab.models import get_model_spec

METRIC_COLUMNS = ("model", "depth", "residual", "epoch", "lr", "train_loss", "train_error", "val_loss",
                  "val_error", "seconds")


@dataclass
class DegradationConfig:
    data: str = "digits"
    depths: list[int] = field(default_factory=lambda: [20, 56])
    epochs: int = 8
    batch_size: int = 128  # the paper's batch (section 4.2)
    # Peak of the one-cycle schedule. 0.05, not the paper's 0.1: as for its 110-layer net (section
    # 4.2, "0.1 is slightly too large to start converging"), resnet56 on the 1,259 digits (10 steps
    # an epoch) diverged at the peak of 0.1 (23% final training error, seed 0); at 0.05 it trains.
    lr: float = 0.05
    recipe: str = "fast"
    image_size: int | None = None  # None: 8 for digits, else the CIFAR nets' native 32
    seed: int = 0
    precision: str = "auto"
    out: str | None = None
    quiet: bool = False

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
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ReslabError(f"--epochs must be an integer of at least 1, got {self.epochs!r}")

    @property
    def models(self) -> list[str]:
        return [f"{kind}{depth}" for depth in sorted(self.depths) for kind in ("plain", "resnet")]

    def resolved_image_size(self) -> int:
        return self.image_size or default_image_size(self.data)

    def train_config(self, model: str, out: Path):
        from reslab.train import TrainConfig

        return TrainConfig(model=model, data=self.data, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           recipe=self.recipe, image_size=self.resolved_image_size(), seed=self.seed,
                           precision=self.precision, out=os.fspath(out / model), quiet=self.quiet)


def run_degradation(config: DegradationConfig, progress=None) -> dict:
    """Train every net of `config` into `out/<model>/`; write summary.json, metrics.csv, degradation.png."""
    from reslab import plots
    from reslab.data import load_data

    out = Path(config.out) if config.out else default_out("degradation")
    if (out / "summary.json").exists():
        raise ReslabError(f"--out {out} already holds a degradation experiment; choose another --out")
    train_configs = {name: config.train_config(name, out).resolve() for name in config.models}
    # The trainer's own split of the data (same seed), for the clean pass over the training set.
    data = load_data(config.data, image_size=config.resolved_image_size(), seed=config.seed, quiet=True)
    models, curves, rows = {}, {}, []
    started = time.perf_counter()
    for net in train_nets(train_configs, progress):
        depth, residual = model_depth(net.name), get_model_spec(net.name).residual
        models[net.name] = {"depth": depth, "residual": residual, **net.errors(data)}
        curves[net.name] = {"depth": depth, "residual": residual, "epoch": [int(m["epoch"]) for m in net.metrics],
                            "train_error": net.train_errors, "val_error": net.val_errors}
        rows += net.metric_rows(net.name, depth, int(residual))
    summary = {
        "experiment": "degradation",
        "models": models,
        "settings": {**asdict(config), "out": os.fspath(out), "image_size": config.resolved_image_size(),
                     "train_config": shared_train_config(train_configs)},
        "definitions": {
            "final_train_error": "last epoch's training error as logged: running average over the epoch, "
                                 "train mode (what the paper's Figure 6 plots)",
            **ERROR_DEFINITIONS,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_csv(out / "metrics.csv", METRIC_COLUMNS, rows)
    write_json(out / "summary.json", summary)
    plots.degradation(curves, out / "degradation.png")
    return summary
