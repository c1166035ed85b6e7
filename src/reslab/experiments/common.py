"""What the experiments share: which layers they look at, models by name or by run, and (for the
two that train nets: degradation, inception) the training of each net and the errors read from it.

The experiments compare a plain net with the residual net of the same depth (paper section 4.2),
so every measurement is keyed by model name and ordered from the input side to the output side.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
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


def has_test_split(data: str) -> bool:
    """Whether the trainer will find a test split in `data`: the digits and CIFAR have one; an image
    folder only as a test/ subfolder (reslab.data.folder)."""
    from reslab.data.cifar import is_cifar_data

    return data == "digits" or is_cifar_data(data) or (Path(data).expanduser() / "test").is_dir()


def check_data(data: str) -> None:
    """Refuse data that is not there before an experiment claims its folder (its nets load it later)."""
    from reslab.data import NAMED

    if data not in NAMED and not Path(data).expanduser().exists():
        raise ReslabError(f"data not found: {data!r}; give {', '.join(NAMED)}, an image folder or a CIFAR tarball")


def is_count(value) -> bool:
    """Whether `value` is an int of at least 1 (a bool is not)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def check_jobs(jobs) -> None:
    """Refuse a number of nets to train at once that is not a positive integer."""
    if not is_count(jobs):
        raise ReslabError(f"--jobs takes a positive integer (nets trained at once), got {jobs!r}")


def check_epochs(epochs) -> None:
    """Refuse a schedule length that is not a whole number of epochs, at least one."""
    if not is_count(epochs):
        raise ReslabError(f"--epochs must be an integer of at least 1, got {epochs!r}")


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """The trainer's optimizer steps per epoch: a last batch of one image is dropped (train/loop.py)."""
    return train_images // batch_size + (1 if train_images % batch_size > 1 else 0)


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
    from reslab.train.steps import evaluate_sums

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
    # steps.csv: the training loss and error over windows of about a tenth of an epoch, by step.
    steps: list[dict] = field(default_factory=list)

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


def train_nets(configs: dict, progress: Callable[[int, int, str], None] | None = None, *, resume: str | None = None,
               stop: Callable[[str, int, int], bool] | None = None, jobs: int = 1) -> Iterator[TrainedNet]:
    """Train each resolved TrainConfig of `configs` (key -> config) in turn, reporting
    `progress(k, n, key)` before each; yields what each run logged.

    With `resume` (the experiment's folder, for the message), a net whose run folder exists is
    continued instead (`continue_run`). `stop(key, epoch, step)` is the trainer's stop hook per
    net; a net that stops before its end (Ctrl-C, `stop`) ends the experiment with a ReslabError
    that says how to continue it. `jobs` > 1 trains that many nets at once, side by side
    (reslab.experiments.parallel), and yields them in the same order."""
    from reslab.train.state import METRICS, STEPS, read_metrics

    if jobs > 1 and len(configs) > 1:
        from reslab.experiments.parallel import train_side_by_side

        results = train_side_by_side(configs, train_one, progress, resume=resume, stop=stop, jobs=jobs,
                                     quiet=all(cfg.quiet for cfg in configs.values()))
    else:
        results = _train_in_turn(configs, progress, resume, stop)
    for name, cfg, result in results:
        if result.get("interrupted"):
            raise ReslabError(f"{name} stopped at epoch {result['epochs'] + 1} of {cfg.epochs} (checkpointed in "
                              f"{result['run_dir']}); continue the experiment with --resume {Path(cfg.out).parent}")
        run_dir = Path(result["run_dir"])
        metrics = read_metrics(run_dir / METRICS)
        steps = read_metrics(run_dir / STEPS) if (run_dir / STEPS).is_file() else []  # none before steps.csv
        yield TrainedNet(name, cfg, result, run_dir, metrics, [error(m["train_acc"]) for m in metrics],
                         [error(m["val_acc"]) for m in metrics], steps)


def _train_in_turn(configs: dict, progress, resume: str | None, stop) -> Iterator[tuple[str, object, dict]]:
    for k, (name, cfg) in enumerate(configs.items()):
        if progress is not None:
            progress(k, len(configs), name)
        hook = None if stop is None else (lambda epoch, step, name=name: stop(name, epoch, step))
        yield name, cfg, train_one(cfg, resume, hook)


def train_one(cfg, resume: str | None, stop: Callable[[int, int], bool] | None = None) -> dict:
    """The trainer's summary of one net of an experiment: trained, or with `resume` continued
    (`continue_run`)."""
    from reslab.train import train

    return continue_run(cfg, stop) if resume is not None else train(cfg, stop=stop)


def continue_run(cfg, stop: Callable[[int, int], bool] | None = None) -> dict:
    """The trainer's summary of the run `cfg` describes (`cfg.out` its folder): a finished run's is
    read back, not trained again; a begun one continues from its last checkpoint through the
    trainer's own --resume (exact: the same steps the uninterrupted run would have taken); a run not
    begun starts."""
    from reslab.train import TrainConfig, train
    from reslab.train.state import CONFIG

    run_dir = Path(cfg.out)
    if not (run_dir / CONFIG).is_file():
        return train(cfg, stop=stop)
    finished = finished_summary(run_dir)
    if finished is not None:
        return finished
    return train(TrainConfig(resume=os.fspath(run_dir), quiet=cfg.quiet, device=cfg.device), stop=stop)


def finished_summary(run_dir: Path) -> dict | None:
    """A run's summary.json once the run ended and its test pass (if it has a test split) is done;
    None while it is unfinished. The trainer writes summary.json after every epoch (stopped
    "running", no test accuracy) and once more at the end."""
    from reslab.train.state import CONFIG, SUMMARY

    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
        record = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("stopped") not in ("completed", "early_stop"):
        return None
    has_test = ((record.get("data") or {}).get("sizes") or {}).get("test", 0) > 0
    if has_test and summary.get("test_acc") is None:
        return None  # killed after its last epoch, before its test pass: the trainer's resume runs that
    return {**summary, "run_dir": os.fspath(run_dir)}


# The experiment's own record in its folder: which experiment, with which settings; --resume reads it.
EXPERIMENT_FILE = "experiment.json"
# Settings a resumed experiment may take anew: they change no net's settings (jobs: how many train at once).
RESUME_FREE = ("out", "resume", "quiet", "jobs")


def claim_experiment_dir(config, experiment: str) -> Path:
    """The experiment's folder, its settings recorded (experiment.json). A new experiment refuses a
    folder that holds one already; `config.resume` names the one to continue."""
    if config.resume is not None:
        return Path(config.resume)
    out = Path(config.out) if config.out else default_out(experiment)
    if (out / EXPERIMENT_FILE).exists() or (out / "summary.json").exists():
        raise ReslabError(f"--out {out} already holds a {experiment} experiment; continue it with --resume {out} "
                          "or choose another --out")
    from reslab.data import data_path
    from reslab.io import write_json

    settings = {k: v for k, v in asdict(config).items() if k not in RESUME_FREE}
    if "data" in settings:  # absolute, so that --resume from another working directory finds it
        settings["data"] = data_path(settings["data"])
    write_json(out / EXPERIMENT_FILE, {"experiment": experiment, "settings": settings})
    return out


def resumed_config(cls, folder: str, experiment: str, given: dict):
    """`cls` (an experiment's config) as saved in `folder`, to continue it. `given`: the options the
    user set; one that differs from the saved setting is refused, since the nets already trained
    used the saved one (out, resume, quiet and jobs may change)."""
    path = Path(folder) / EXPERIMENT_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReslabError(f"--resume {folder}: holds no {experiment} experiment (no {EXPERIMENT_FILE}); give the "
                          f"--out of an earlier `reslab experiment {experiment}`") from None
    except (OSError, ValueError) as err:
        raise ReslabError(f"--resume {folder}: {EXPERIMENT_FILE} is unreadable ({err})") from None
    if not isinstance(saved, dict) or saved.get("experiment") != experiment or not isinstance(
            saved.get("settings"), dict):
        raise ReslabError(f"--resume {folder}: {EXPERIMENT_FILE} does not describe a {experiment} experiment")
    settings = {k: v for k, v in saved["settings"].items() if k in {f.name for f in fields(cls)}}
    if "out" in given and Path(given["out"]).resolve() != Path(folder).resolve():
        raise ReslabError(f"--resume {folder} continues the experiment in its own folder; drop --out {given['out']}")
    from reslab.data import data_path

    if "data" in settings:  # recorded absolute (claim_experiment_dir); as typed before that
        settings["data"] = data_path(settings["data"])
    for key, value in given.items():
        if key == "data":
            value = data_path(value)
        if key in settings and key not in RESUME_FREE and value != settings[key]:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            was = " ".join(map(str, settings[key])) if isinstance(settings[key], (list, tuple)) else settings[key]
            raise ReslabError(f"--resume {folder} continues the experiment with its own settings: "
                              f"--{key.replace('_', '-')} {shown} differs from its {was}; drop the option")
    extra = {k: v for k, v in given.items() if k in ("quiet", "jobs")}
    return cls(**settings, **extra, out=os.fspath(folder), resume=os.fspath(folder))


def shared_train_config(configs: dict) -> dict:
    """The trainer's resolved settings all nets of an experiment share (all but model and out)."""
    first = next(iter(configs.values()))
    return {k: v for k, v in first.to_dict().items() if k not in ("model", "out")}
