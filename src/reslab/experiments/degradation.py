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
from reslab.experiments.common import default_image_size, default_out, model_depth
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


def train_error_eval(run_dir: Path, data, precision: str) -> float:
    """Error of the last epoch's weights on the whole training set, eval mode, no augmentation.

    The logged training error is a running average over an epoch of changing weights in train
    mode (BN batch statistics, augmentation); this is the same net judged as it would be used.
    """
    from reslab.checkpoint import LAST, load_model
    from reslab.data import BatchLoader
    from reslab.hardware import resolve_precision
    from reslab.train.loop import evaluate_sums

    model, _ = load_model(run_dir / LAST)
    loader = BatchLoader(data.train, 256, shuffle=False, mean=data.mean, std=data.std)
    _, correct, count = evaluate_sums(model, loader, resolve_precision(precision, "cpu")).tolist()
    return 1.0 - correct / count


def _error(acc: float | None) -> float | None:
    return None if acc is None else 1.0 - acc


def run_degradation(config: DegradationConfig, progress=None) -> dict:
    """Train every net of `config` into `out/<model>/`; write summary.json, metrics.csv, degradation.png."""
    from reslab import plots
    from reslab.data import load_data
    from reslab.train import train
    from reslab.train.state import METRICS, read_metrics

    out = Path(config.out) if config.out else default_out("degradation")
    if (out / "summary.json").exists():
        raise ReslabError(f"--out {out} already holds a degradation experiment; choose another --out")
    train_configs = {name: config.train_config(name, out).resolve() for name in config.models}
    # The trainer's own split of the data (same seed), for the clean pass over the training set.
    data = load_data(config.data, image_size=config.resolved_image_size(), seed=config.seed, quiet=True)
    models, curves, rows = {}, {}, []
    started = time.perf_counter()
    for k, (name, cfg) in enumerate(train_configs.items()):
        if progress is not None:
            progress(k, len(train_configs), name)
        result = train(cfg)
        run_dir = Path(result["run_dir"])
        metrics = read_metrics(run_dir / METRICS)
        train_errors = [_error(m["train_acc"]) for m in metrics]
        val_errors = [_error(m["val_acc"]) for m in metrics]
        depth, residual = model_depth(name), get_model_spec(name).residual
        models[name] = {
            "depth": depth,
            "residual": residual,
            "final_train_error": train_errors[-1],
            "best_train_error": min(train_errors),
            "train_error_eval": train_error_eval(run_dir, data, cfg.precision),
            "final_val_error": val_errors[-1],
            "best_val_error": min((e for e in val_errors if e is not None), default=None),
            "test_error": _error(result.get("test_acc")),
            "seconds": result["train_seconds"],
            "run_dir": os.fspath(run_dir),
        }
        curves[name] = {"depth": depth, "residual": residual, "epoch": [int(m["epoch"]) for m in metrics],
                        "train_error": train_errors, "val_error": val_errors}
        for m, train_err, val_err in zip(metrics, train_errors, val_errors):
            rows.append([name, depth, int(residual), int(m["epoch"]), m["lr"], m["train_loss"], train_err,
                         m["val_loss"], val_err, m["seconds"]])
    summary = {
        "experiment": "degradation",
        "models": models,
        "settings": {**asdict(config), "out": os.fspath(out), "image_size": config.resolved_image_size(),
                     "train_config": {k: v for k, v in train_configs[config.models[0]].to_dict().items()
                                      if k not in ("model", "out")}},
        "definitions": {
            "final_train_error": "last epoch's training error as logged: running average over the epoch, "
                                 "train mode (what the paper's Figure 6 plots)",
            "best_train_error": "lowest logged training error over the epochs",
            "train_error_eval": "last epoch's weights on the whole training set, eval mode, no augmentation",
            "final_val_error": "validation error after the last epoch",
            "test_error": "test error of the best-validation weights (the trainer's test pass); null without a "
                          "test split",
            "seconds": "training time of the net as the trainer measured it",
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_csv(out / "metrics.csv", METRIC_COLUMNS, rows)
    write_json(out / "summary.json", summary)
    plots.degradation(curves, out / "degradation.png")
    return summary
