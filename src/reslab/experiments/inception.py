"""Residual connections in inception nets: do they speed up training? (Szegedy et al. 2016)

"Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning" (section 5,
Figures 21-26) finds that Inception-ResNet trains markedly faster than an Inception net of about
the same cost, and ends about as good. Here the nets are trained through `reslab.train` with one
recipe and one seed on the same data, as in the degradation experiment: the CIFAR plain and
residual nets and the small inception nets of about the same size. `inception_resnet_small_plain`
is `inception_resnet_small` with its residual adds removed and nothing else changed, so that pair
isolates the shortcut more strictly than the paper's Inception-v4 against Inception-ResNet-v2.

"Faster" is read from the training curves: the mean of the logged training error over the epochs
(the area under the curve), and the first epoch at which it falls to `target_train_error`.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reslab.errors import ReslabError
from reslab.experiments.common import (
    ERROR_DEFINITIONS,
    check_epochs,
    check_jobs,
    check_model_names,
    default_out,
    shared_train_config,
    train_nets,
)
from reslab.io import write_csv, write_json
from reslab.models import get_model_spec

METRIC_COLUMNS = ("model", "family", "residual", "epoch", "lr", "train_loss", "train_error", "val_loss",
                  "val_error", "seconds")

# Four nets of about 0.85M parameters and 0.13 GMACs at 32x32: a plain and a residual CIFAR net
# (paper section 4.2), and an inception net without and with residual adds.
DEFAULT_MODELS = ["plain56", "resnet56", "inception_resnet_small_plain", "inception_resnet_small"]


@dataclass
class InceptionConfig:
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    data: str = "digits"
    # The degradation experiment's recipe (see DegradationConfig for why lr 0.05), so that the
    # CIFAR nets' results can be read against it.
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    recipe: str = "fast"
    # None: the nets' native input, 32 for the default ones. Not the digits' own 8x8 as in the
    # degradation experiment: the CIFAR nets halve the grid twice (8 -> 2) but the inception nets'
    # unpadded reductions three times (inception_resnet_small: 32 -> 15 -> 7, so 8 -> 3 -> 1), which
    # leaves their last blocks' 1x3 and 3x1 convs looking at padding. At its native size each net
    # gets the grids it was designed for, and the comparison is of architectures, not of input sizes.
    image_size: int | None = None
    target_train_error: float = 0.05  # for `epochs_to_target`
    seed: int = 0
    precision: str = "auto"
    out: str | None = None
    quiet: bool = False
    jobs: int = 1  # nets trained at once, side by side (reslab.experiments.parallel)

    def __post_init__(self):
        self.models = list(self.models)
        check_model_names(self.models)
        check_epochs(self.epochs)
        check_jobs(self.jobs)
        size = self.image_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
            raise ReslabError(f"--image-size must be an integer of at least 8, got {self.image_size!r}")
        if not isinstance(self.target_train_error, (int, float)) or not 0 < self.target_train_error < 1:
            raise ReslabError(f"--target must be a training error between 0 and 1 (a fraction), "
                              f"got {self.target_train_error!r}")

    def resolved_image_size(self) -> int:
        # The largest native input among the nets, so that none gets less than it was designed for.
        return self.image_size or max(get_model_spec(name).image_size for name in self.models)

    def train_config(self, model: str, out: Path):
        from reslab.train import TrainConfig

        return TrainConfig(model=model, data=self.data, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           recipe=self.recipe, image_size=self.resolved_image_size(), seed=self.seed,
                           precision=self.precision, out=os.fspath(out / model), quiet=self.quiet)


def plain_twin(name: str) -> str | None:
    """The registered net that is `name` without its shortcuts (resnet56 -> plain56,
    inception_resnet_small -> inception_resnet_small_plain), or None."""
    for candidate in (re.sub(r"^resnet(\d+)$", r"plain\1", name), f"{name}_plain"):
        if candidate == name:
            continue
        try:
            spec = get_model_spec(candidate)
        except ReslabError:
            continue
        if not spec.residual and spec.depth == get_model_spec(name).depth:
            return candidate
    return None


def _first_epoch_at_or_below(errors: list[float], target: float) -> int | None:
    return next((epoch for epoch, e in enumerate(errors, 1) if e <= target), None)


def run_inception(config: InceptionConfig, progress=None) -> dict:
    """Train every net of `config` into `out/<model>/`; write summary.json, metrics.csv, inception.png."""
    from reslab import plots
    from reslab.checkpoint import LAST, load_model
    from reslab.data import load_data
    from reslab.models import complexity

    out = Path(config.out) if config.out else default_out("inception")
    if (out / "summary.json").exists():
        raise ReslabError(f"--out {out} already holds an experiment; choose another --out")
    size = config.resolved_image_size()
    train_configs = {name: config.train_config(name, out).resolve() for name in config.models}
    # The trainer's own split of the data (same seed), for the clean pass over the training set.
    data = load_data(config.data, image_size=size, seed=config.seed, quiet=True)
    models, curves, rows, precisions = {}, {}, [], set()
    started = time.perf_counter()
    for net in train_nets(train_configs, progress, jobs=config.jobs):
        name, train_errors = net.name, net.train_errors
        epoch_seconds = [m["seconds"] for m in net.metrics]
        spec = get_model_spec(name)
        measured = complexity(load_model(net.run_dir / LAST)[0], (data.in_channels, size, size))
        target_epoch = _first_epoch_at_or_below(train_errors, config.target_train_error)
        precisions.add(net.result.get("precision"))
        models[name] = {
            "model": name,
            "family": spec.family,
            "residual": spec.residual,
            "plain_twin": plain_twin(name),
            "depth": spec.depth,
            "params": measured["params"],
            "macs": measured["macs"],
            **net.errors(data),
            "mean_train_error": sum(train_errors) / len(train_errors),
            "epochs_to_target": target_epoch,
            "seconds_to_target": None if target_epoch is None else sum(epoch_seconds[:target_epoch]),
            "seconds_per_epoch": statistics.median(epoch_seconds),
            "precision": net.result.get("precision"),
        }
        curves[name] = {"residual": spec.residual, "plain_twin": plain_twin(name), "params": measured["params"],
                        "epoch": [int(m["epoch"]) for m in net.metrics], "train_error": train_errors,
                        "train_loss": [m["train_loss"] for m in net.metrics],
                        "seconds": [sum(epoch_seconds[: i + 1]) for i in range(len(epoch_seconds))]}
        rows += net.metric_rows(name, spec.family, int(spec.residual))
    pairs = [{"plain": models[name]["plain_twin"], "residual": name,
              **{f"{key}_gap": models[models[name]["plain_twin"]][key] - models[name][key]
                 for key in ("final_train_error", "mean_train_error")}}
             for name in models if models[name]["plain_twin"] in models]
    summary = {
        "experiment": "inception",
        "models": models,
        "pairs": pairs,
        "settings": {**asdict(config), "out": os.fspath(out), "image_size": size,
                     "precision_resolved": precisions.pop() if len(precisions) == 1 else sorted(map(str, precisions)),
                     "train_config": shared_train_config(train_configs)},
        "definitions": {
            "final_train_error": "last epoch's training error as logged: running average over the epoch, "
                                 "train mode (as the degradation experiment and the paper's Figure 6)",
            **ERROR_DEFINITIONS,
            "mean_train_error": "mean of the logged training errors over the epochs: the area under the "
                                "training curve per epoch; lower means the net trained faster",
            "epochs_to_target": "first epoch whose logged training error is at most settings.target_train_error; "
                                "null if none",
            "seconds_to_target": "training seconds up to the end of that epoch",
            "params": "parameters of the trained net (its input channels and classes)",
            "macs": "multiply-accumulates of one forward pass at settings.image_size",
            "seconds_per_epoch": "median over the epochs of the training steps' wall time",
            "pairs": "each residual net beside its plain twin (the same net without shortcuts); a gap is "
                     "the plain net's value minus the residual net's",
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_csv(out / "metrics.csv", METRIC_COLUMNS, rows)
    write_json(out / "summary.json", summary)
    plots.inception_curves(curves, out / "inception.png")
    return summary
