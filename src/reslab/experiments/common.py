"""What the experiments share: which layers they look at, models by name or by run, and (for the
two that train nets: degradation, inception) the training of each net and the errors read from it.

The experiments compare a plain net with the residual net of the same depth (paper section 4.2),
so every measurement is keyed by model name and ordered from the input side to the output side.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from reslab.errors import ReslabError
from reslab.models import ResidualAdd, get_model_spec

# The digits are 8x8 images: feeding them at their own size costs 16x less than upsampling to the
# CIFAR nets' native 32x32 and shows the same optimization difficulty (docs/experiments.md).
NATIVE_SIZES = {"digits": 8}


def default_image_size(data: str) -> int:
    """8 for the digits, else the CIFAR nets' native 32 (paper section 4.2)."""
    return NATIVE_SIZES.get(data, get_model_spec("resnet20").image_size)


def default_out(experiment: str) -> Path:
    return Path("runs") / f"experiment-{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_model_names(names: list[str]) -> None:
    """Registered names, each once (the experiments compare plain/residual pairs, paper section 4.2)."""
    if not names:
        raise ReslabError("give at least one model, e.g. plain20 resnet20")
    if len(set(names)) != len(names):
        raise ReslabError(f"each model may be given once, got {' '.join(names)}")
    for name in names:
        get_model_spec(name)  # unknown names fail here with the list of close matches


def model_depth(name: str) -> int:
    return get_model_spec(name).depth


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions and the classifier along the main path, input side first.

    These are the paper's counted layers (a 6n+2 net has 6n+2 of them); projection shortcuts
    (`downsample`) are left out so that plain and residual nets of one depth line up layer by layer.
    """
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and ".downsample" not in f".{name}":
            layers.append((name, module))
    return layers


def residual_branch_outputs(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Where each block's residual function ends: (block name, module to hook, how).

    Paper Figure 7 measures responses "after BN and before other nonlinearity (ReLU/addition)".
    A residual block's `ResidualAdd` receives that tensor as its first input ("pre": a forward
    pre-hook on the add); a plain block has no add, so its last BN's output is the same point
    ("post": a forward hook on the BN).
    """
    points = []
    for name, module in model.named_modules():
        if not hasattr(type(module), "residual"):  # blocks declare it; the net and its layers do not
            continue
        if getattr(module, "preact", False):
            raise ReslabError(
                f"layer responses are defined for post-activation blocks (paper Figure 7); {name} is a "
                "pre-activation block whose branch ends in a conv, not a BN"
            )
        add = getattr(module, "add", None)
        if isinstance(add, ResidualAdd):
            points.append((name, add, "pre"))
        else:
            last_bn = module.bn3 if hasattr(module, "bn3") else module.bn2
            points.append((name, last_bn, "post"))
    return points


# What a training experiment's per-net error fields mean (TrainedNet.errors); each experiment adds its own.
ERROR_DEFINITIONS = {
    "best_train_error": "lowest logged training error over the epochs",
    "train_error_eval": "last epoch's weights on the whole training set, eval mode, no augmentation",
    "final_val_error": "validation error after the last epoch",
    "test_error": "test error of the best-validation weights (the trainer's test pass); null without a test split",
    "seconds": "training time of the net as the trainer measured it",
}


def error(acc: float | None) -> float | None:
    return None if acc is None else 1.0 - acc


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


@dataclass
class TrainedNet:
    """One net an experiment trained: the trainer's summary, its run folder and its logged curves."""

    name: str
    config: object  # the resolved reslab.train.TrainConfig
    result: dict
    run_dir: Path
    metrics: list[dict]
    train_errors: list[float]
    val_errors: list[float | None]

    def errors(self, data) -> dict:
        """The error fields every training experiment reports (ERROR_DEFINITIONS); `data` is the
        trainer's own split, for `train_error_eval`."""
        return {
            "final_train_error": self.train_errors[-1],
            "best_train_error": min(self.train_errors),
            "train_error_eval": train_error_eval(self.run_dir, data, self.config.precision),
            "final_val_error": self.val_errors[-1],
            "best_val_error": min((e for e in self.val_errors if e is not None), default=None),
            "test_error": error(self.result.get("test_acc")),
            "seconds": self.result["train_seconds"],
            "run_dir": os.fspath(self.run_dir),
        }

    def metric_rows(self, *label) -> list[list]:
        """metrics.csv rows: `label` (the model and what the experiment keys it by), then the epoch's
        lr, training loss and error, validation loss and error, and seconds."""
        return [[*label, int(m["epoch"]), m["lr"], m["train_loss"], train_err, m["val_loss"], val_err, m["seconds"]]
                for m, train_err, val_err in zip(self.metrics, self.train_errors, self.val_errors)]


def train_nets(configs: dict, progress: Callable[[int, int, str], None] | None = None) -> Iterator[TrainedNet]:
    """Train each resolved TrainConfig of `configs` (model name -> config) in turn, reporting
    `progress(k, n, name)` before each; yields what each run logged."""
    from reslab.train import train
    from reslab.train.state import METRICS, read_metrics

    for k, (name, cfg) in enumerate(configs.items()):
        if progress is not None:
            progress(k, len(configs), name)
        result = train(cfg)
        run_dir = Path(result["run_dir"])
        metrics = read_metrics(run_dir / METRICS)
        yield TrainedNet(name, cfg, result, run_dir, metrics, [error(m["train_acc"]) for m in metrics],
                         [error(m["val_acc"]) for m in metrics])


def shared_train_config(configs: dict) -> dict:
    """The trainer's resolved settings all nets of an experiment share (all but model and out)."""
    first = next(iter(configs.values()))
    return {k: v for k, v in first.to_dict().items() if k not in ("model", "out")}
