"""The paper's Table 6 (section 4.2): CIFAR-10 test error of ResNet-20/32/44/56/110, over seeds.

Each depth and seed is an ordinary `reslab train` run with the paper recipe (`--recipe paper`:
batch 128, SGD momentum 0.9, weight decay 1e-4 on every weight, lr 0.1 divided by 10 at 50 % and
75 % of the schedule, 182 epochs = 64k iterations on 45k images), flip and 4-pixel pad-and-crop
(the "cifar" augmentation, on an image folder too), option A shortcuts.

What is reported, and why it can be trusted:

- By default every training image is trained on (`val_split=0`) and the weights at the end of the
  schedule are tested, as the paper does. With `val_split`, the weights of the best validation
  epoch are tested instead. Nothing is ever chosen on the test split: the trainer reads it once,
  after the last epoch.
- Per depth: mean, standard deviation (over seeds, n - 1 in the denominator; None for one run),
  min and max of the test error, beside the paper's number. The paper's 6.43 % for ResNet-110 is
  the best of 5 runs (its mean is 6.61 ± 0.16); the others are single runs.
- A data set without a test split (an image folder without test/): the validation split (default
  0.1 there, the paper's 45k/5k) is the only held-out data, so the error of the weights at the end
  of the schedule on it is reported instead: summary.json says "evaluated_on": "validation", the
  `test_error_*` keys then hold those validation errors, and the table and figure say so. The
  best-validation weights are never used there: they were chosen on the very images reported.

The paper warms ResNet-110 up at lr 0.01 "until the training error is below 80 % (about 400
iterations)" before going back to 0.1. The trainer's schedules are pure functions of the step, so
the warm-up here is a fixed one: WARMUP_EPOCHS (one epoch, 352 iterations on 45k images) of the
trainer's linear warm-up from 0 to 0.1, for depths of at least WARMUP_DEPTH.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reslab.errors import ReslabError
from reslab.experiments.common import (
    check_data,
    check_epochs,
    check_jobs,
    claim_experiment_dir,
    error,
    has_test_split,
    resumed_config,
    shared_train_config,
    train_nets,
)
from reslab.io import write_json
from reslab.models import get_model_spec

# Paper Table 6, CIFAR-10 test error (%), as fractions. 110: best of 5 runs (mean 6.61 ± 0.16).
PAPER_TEST_ERROR = {20: 0.0875, 32: 0.0751, 44: 0.0717, 56: 0.0697, 110: 0.0643, 1202: 0.0793}
DEPTHS = (20, 32, 44, 56, 110)
SEEDS = (0, 1)
# Section 4.2's warm-up for ResNet-110 (see the module docstring): fixed, one epoch, linear.
WARMUP_DEPTH, WARMUP_EPOCHS = 110, 1.0
# A folder without a test split holds out the paper's 45k/5k split to report on.
FOLDER_VAL_SPLIT = 0.1
DEPTH_KEYS = ("depth", "runs", "test_error_mean", "test_error_std", "test_error_min", "test_error_max",
              "paper_test_error")


@dataclass
class Table6Config:
    data: str = "cifar10"
    depths: list[int] = field(default_factory=lambda: list(DEPTHS))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    epochs: int = 182  # the paper's 64k iterations at batch 128 on 45k images; milestones at 50 % and 75 %
    # None: 0 (all training images, the weights at the end) where the data has a test split, else FOLDER_VAL_SPLIT.
    val_split: float | None = None
    precision: str = "auto"
    out: str | None = None
    resume: str | None = None  # an earlier experiment's folder to continue (see `resumed`)
    quiet: bool = False
    jobs: int = 1  # nets trained at once, side by side (reslab.experiments.parallel)

    def __post_init__(self):
        self.depths, self.seeds = list(self.depths), list(self.seeds)
        for flag, values in (("depths", self.depths), ("seeds", self.seeds)):
            if not values:
                raise ReslabError(f"--{flag} needs at least one value, e.g. --{flag} "
                                  f"{' '.join(map(str, DEPTHS if flag == 'depths' else SEEDS))}")
            if len(set(values)) != len(values):
                raise ReslabError(f"--{flag} lists a value twice: {' '.join(map(str, values))}")
            for value in values:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ReslabError(f"--{flag} takes non-negative integers, got {value!r}")
        for depth in self.depths:
            get_model_spec(f"resnet{depth}")  # a depth that is not 6n+2 is refused here, with the reason
        check_epochs(self.epochs)
        check_jobs(self.jobs)

    @classmethod
    def resumed(cls, folder: str, **given) -> Table6Config:
        """The experiment saved in `folder`, to continue; `given` options must match its settings."""
        return resumed_config(cls, folder, "table6", given)

    @property
    def evaluated_on(self) -> str:
        return "test" if has_test_split(self.data) else "validation"

    def resolved_val_split(self) -> float:
        if self.val_split is not None:
            return self.val_split
        return 0.0 if self.evaluated_on == "test" else FOLDER_VAL_SPLIT

    @property
    def runs(self) -> list[tuple[int, int]]:
        """(depth, seed) in training order: depth by depth, so each row of the table fills in turn."""
        return [(depth, seed) for depth in sorted(self.depths) for seed in self.seeds]

    def train_config(self, depth: int, seed: int, out: Path):
        from reslab.train import TrainConfig

        warmup = min(WARMUP_EPOCHS, self.epochs) if depth >= WARMUP_DEPTH else None
        return TrainConfig(model=f"resnet{depth}", data=self.data, recipe="paper", epochs=self.epochs,
                           val_split=self.resolved_val_split(), augment="cifar", image_size=32, seed=seed,
                           warmup_epochs=warmup, precision=self.precision, out=os.fspath(out / run_name(depth, seed)),
                           quiet=self.quiet)


def run_name(depth: int, seed: int) -> str:
    return f"resnet{depth}-seed{seed}"


def depth_entry(depth: int, errors: list[float]) -> dict:
    """One row of the table: exactly DEPTH_KEYS, errors as fractions."""
    n = len(errors)
    mean = sum(errors) / n if n else None
    std = math.sqrt(sum((e - mean) ** 2 for e in errors) / (n - 1)) if n > 1 else None
    return {"depth": depth, "runs": n, "test_error_mean": mean, "test_error_std": std,
            "test_error_min": min(errors, default=None), "test_error_max": max(errors, default=None),
            "paper_test_error": PAPER_TEST_ERROR.get(depth)}


def run_record(config: Table6Config, depth: int, seed: int, net) -> dict:
    """What one run reports: the held-out error (see the module docstring) and which weights gave it."""
    result, val_split = net.result, config.resolved_val_split()
    if config.evaluated_on == "test":
        reported = error(result["test_acc"])
        weights = f"best validation (epoch {result['best_epoch']})" if val_split else "end of schedule"
    else:
        reported = net.val_errors[-1]
        weights = "end of schedule"
    return {"depth": depth, "seed": seed, "test_error": reported, "weights": weights,
            "final_train_error": net.train_errors[-1], "final_val_error": net.val_errors[-1],
            "epochs": result["epochs"], "seconds": result["train_seconds"], "run_dir": os.fspath(net.run_dir)}


def run_table6(config: Table6Config, progress=None, stop=None) -> dict:
    """Train every (depth, seed) of `config` into `out/resnet<depth>-seed<seed>/`; write summary.json
    and table6.png (both rewritten after every run, so a killed experiment shows what it finished).

    `stop(run name, epoch, step)`: the trainer's stop hook for each run (as Ctrl-C: the run
    checkpoints and the experiment ends with a ReslabError naming --resume)."""
    from reslab import plots

    for depth, seed in config.runs:  # impossible settings are refused before the folder is claimed
        config.train_config(depth, seed, Path(".")).resolve()
    check_data(config.data)
    if config.evaluated_on == "validation" and not config.resolved_val_split():
        raise ReslabError(f"{config.data} has no test split, so --val-split 0 leaves no held-out image to report "
                          f"on; give --val-split F (default {FOLDER_VAL_SPLIT} there)")
    out = claim_experiment_dir(config, "table6")
    train_configs = {run_name(d, s): config.train_config(d, s, out).resolve() for d, s in config.runs}
    started = time.perf_counter()
    runs = []
    summary: dict = {}
    nets = train_nets(train_configs, progress, resume=config.resume, stop=stop, jobs=config.jobs)
    for (depth, seed), net in zip(config.runs, nets):
        runs.append(run_record(config, depth, seed, net))
        summary = _summary(config, out, runs, train_configs, time.perf_counter() - started)
        write_json(out / "summary.json", summary)
        plots.table6(summary, out / "table6.png")
    return summary


def _summary(config: Table6Config, out: Path, runs: list[dict], train_configs: dict, seconds: float) -> dict:
    depths = [depth_entry(d, [r["test_error"] for r in runs if r["depth"] == d]) for d in sorted(config.depths)]
    shared = shared_train_config(train_configs)
    shared.pop("seed")
    shared.pop("warmup_epochs")
    validation = config.evaluated_on == "validation"
    return {
        "experiment": "table6",
        "evaluated_on": config.evaluated_on,
        "complete": len(runs) == len(config.runs),
        "depths": [d for d in depths if d["runs"]],
        "runs": runs,
        "settings": {**asdict(config), "out": os.fspath(out), "val_split": config.resolved_val_split(),
                     "warmup": {"depth_at_least": WARMUP_DEPTH, "epochs": WARMUP_EPOCHS, "shape": "linear from 0"},
                     "train_config": shared},
        "definitions": {
            "test_error": ("validation error of the weights at the end of the schedule: the data has no test "
                           "split (test_error_* hold validation errors)") if validation else
                          ("test error of the weights at the end of the schedule (val_split 0) or of the best "
                           "validation epoch; the test split is read once, after training"),
            "test_error_std": "sample standard deviation over the seeds (n - 1); null for one run",
            "paper_test_error": "the paper's Table 6 (110: best of 5 runs, whose mean is 6.61 +- 0.16 %)",
        },
        "seconds": round(seconds, 1),
    }
