"""Small photo folders from scratch: which model, size and ingredients learn best (reslab issue 14).

Every measurement behind benchmarks/RESULTS.md, "Small photo folders", is one command here:

    # ablations: fixed epochs (a loaded machine changes minutes, not accuracy), two seeds
    .venv/bin/python benchmarks/bench_photos.py ablate --variants base no-trivial erasing mixup cutmix ema \\
        --epochs 40 --seeds 0 1 --out /tmp/photos-ablate.jsonl
    # model and input size at equal epochs, and the step time of each on this machine
    .venv/bin/python benchmarks/bench_photos.py ablate --variants r18-64 r18-96 base r18-128 r18-deep r20-64 \\
        --epochs 40 --seeds 0 1 --out /tmp/photos-models.jsonl
    .venv/bin/python benchmarks/bench_photos.py speed --variants r18-64 r18-96 base r18-128 r18-deep r20-64
    # the goal: `reslab train --data cats-vs-dogs-2000 --val-split 0.1 --budget 15m`, 5/15/30 minutes
    .venv/bin/python benchmarks/bench_photos.py budget --budgets 5m 15m 30m --seeds 0 1 --out /tmp/photos-budget.jsonl
    # the second kind of data: the embedded digits written out as a folder of 32 px PNGs
    .venv/bin/python benchmarks/bench_photos.py ablate --data digits-folder --variants base no-trivial ... \\
        --image-size 32 --epochs 15 --seeds 0 1

Each run is one JSON line (appended to --out): variant, seed, the options given, best and final
validation accuracy, minutes of wall clock, and the 1-minute load average at start and end (the
machine is shared; minutes under load are not speeds). Minutes of CPU, so not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repo
DATA = SHARED / "cats-vs-dogs-2000"

# Each variant is the options it gives `reslab train` beyond --data, --val-split, --seed and
# --epochs; "base" is the photo-folder default (nothing given), the others change one thing.
# Variants join with "+": "r18-64+lr-0.05" is resnet18 at 64 px with a peak lr of 0.05.
VARIANTS: dict[str, dict] = {
    "base": {},
    "lr-0.2": {"lr": 0.2},
    "lr-0.1": {"lr": 0.1},
    "lr-0.05": {"lr": 0.05},
    "lr-0.02": {"lr": 0.02},
    # ingredients, each against the default
    "no-trivial": {"augment": "folder"},
    "erasing": {"random_erasing": 0.25},
    "mixup": {"mixup": 0.2},
    "cutmix": {"cutmix": 1.0},
    "mixup-cutmix": {"mixup": 0.2, "cutmix": 1.0},
    "ema": {"ema": 0.99},
    "ema-999": {"ema": 0.999},
    "no-smoothing": {"label_smoothing": 0.0},
    # the measurement: the defaults of the time (resnet18 at 64 px, the folder policy)
    "issue-r18-64": {"model": "resnet18", "image_size": 64, "augment": "folder"},
    "issue-r20-64": {"model": "resnet20", "image_size": 64, "augment": "folder"},
    # model, stem and input size
    "r18-64": {"model": "resnet18", "image_size": 64},
    "r18-96": {"model": "resnet18", "image_size": 96},
    "r18-112": {"model": "resnet18", "image_size": 112},
    "r18-128": {"model": "resnet18", "image_size": 128},
    "r18-160": {"model": "resnet18", "image_size": 160},
    "r18-deep": {"model": "resnet18", "image_size": 112, "stem": "deep"},
    "r18-deep-96": {"model": "resnet18", "image_size": 96, "stem": "deep"},
    "r18-cifar-32": {"model": "resnet18", "image_size": 32, "stem": "cifar"},
    "r20-64": {"model": "resnet20", "image_size": 64},
    "r20-32": {"model": "resnet20", "image_size": 32},  # digits-folder: the CIFAR net at its own size
    "r34-112": {"model": "resnet34", "image_size": 112},
}


def variant(name: str) -> dict:
    options: dict = {}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant {part!r}; choose from {', '.join(VARIANTS)}")
        options.update(VARIANTS[part])
    return options


def load() -> float:
    return round(os.getloadavg()[0], 2)


def write_digits_folder(root: Path) -> Path:
    """The embedded digits (all 1,797, upscaled to 32 px as `--data digits` does) as PNG class folders."""
    from PIL import Image

    from reslab.data import load_data

    if (root / "9").is_dir():
        return root
    bundle = load_data("digits", image_size=32, val_split=0.0)
    counts: dict[int, int] = {}
    for split in (bundle.train, bundle.test):
        for image, label in zip(split.images, split.labels.tolist()):
            folder = root / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            counts[label] = counts.get(label, 0) + 1
            Image.fromarray(image[0].numpy()).save(folder / f"{counts[label]}.png")
    return root


def data_path(name: str) -> str:
    if name == "digits-folder":
        return str(write_digits_folder(Path(tempfile.gettempdir()) / "reslab-digits-folder"))
    return name


def train_once(data: str, options: dict, seed: int, *, epochs: int | None, budget: float | None,
               image_size: int | None, out: str) -> dict:
    from reslab.train import TrainConfig, train
    from reslab.train.state import read_metrics

    options = dict(options)
    if image_size is not None:
        options.setdefault("image_size", image_size)
    start, load_start = time.perf_counter(), load()
    summary = train(TrainConfig(data=data, val_split=0.1, seed=seed, epochs=epochs, budget=budget, out=out,
                                quiet=True, **options))
    config = json.loads((Path(out) / "config.json").read_text())["config"]
    rows = read_metrics(Path(out) / "metrics.csv")
    ema = {}
    if rows and rows[-1].get("ema_val_acc") is not None:  # the same training, its average evaluated too
        ema = {"final_ema_val_acc": rows[-1]["ema_val_acc"], "best_ema_val_acc": max(r["ema_val_acc"] for r in rows),
               "best_model_val_acc": max(r["val_acc"] for r in rows)}
    return {"seed": seed, "options": options, "model": config["model"], "stem": config["stem"],
            "image_size": config["image_size"], "epochs": summary["epochs"], **ema,
            "best_val_acc": summary["best_val_acc"], "final_val_acc": summary["final_val_acc"],
            "best_weights": summary["best_weights"], "minutes": round((time.perf_counter() - start) / 60, 2),
            "train_minutes": round(summary["train_seconds"] / 60, 2), "load_start": load_start, "load_end": load(),
            "budget": summary.get("budget"), "tta": summary.get("tta"), "tta_val_acc": summary.get("tta_val_acc")}


def emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def ablate(args) -> None:
    data = data_path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in args.variants:
                row = train_once(data, variant(name), seed, epochs=args.epochs, budget=None,
                                 image_size=args.image_size, out=f"{tmp}/{name}-{seed}")
                emit({"kind": "ablate", "data": args.data, "variant": name, **row}, args.out)


def budget(args) -> None:
    from reslab.train.config import parse_duration

    data = data_path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for text in args.budgets:
                for name in args.variants:
                    row = train_once(data, variant(name), seed, epochs=None, budget=parse_duration(text),
                                     image_size=args.image_size, out=f"{tmp}/{name}-{text}-{seed}")
                    emit({"kind": "budget", "data": args.data, "variant": name, "budget_text": text, **row}, args.out)


def speed(args) -> None:
    """Seconds per training step (batch 64, the trainer's own step and augmentation) of each variant."""
    import torch

    from reslab.data import BatchLoader, load_data
    from reslab.hardware import resolve_precision, train_channels_last
    from reslab.models import create_model, get_model_spec
    from reslab.train import TrainConfig
    from reslab.train.steps import build_optimizer, make_step

    data = data_path(args.data)
    for name in args.variants:
        cfg = TrainConfig(data=data, val_split=0.1, **variant(name)).resolve()
        size = cfg.image_size or get_model_spec(cfg.model).image_size
        bundle = load_data(data, image_size=size, val_split=0.1, quiet=True)
        precision = resolve_precision("auto")
        channels_last = train_channels_last(precision)
        options = {"stem": cfg.stem} if cfg.stem else {}
        model = create_model(cfg.model, num_classes=len(bundle.classes), **options)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        step = make_step(model, build_optimizer(model, cfg), precision=precision, grad_clip=None,
                         loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=0.1))
        loader = BatchLoader(bundle.train, cfg.batch_size, augment=cfg.augment or bundle.augment, mean=bundle.mean,
                             std=bundle.std, channels_last=channels_last)
        batches = iter(loader)
        for _ in range(2):
            step(*next(batches))
        start, load_start, n = time.perf_counter(), load(), 0
        for x, y in batches:
            step(x, y)
            n += 1
            if n >= args.steps:
                break
        seconds = (time.perf_counter() - start) / n
        emit({"kind": "speed", "variant": name, "model": cfg.model, "stem": cfg.stem, "image_size": size,
              "precision": precision, "step_seconds": round(seconds, 4),
              "images_per_second": round(cfg.batch_size / seconds, 1), "load_start": load_start,
              "load_end": load()}, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("ablate", "budget", "speed"))
    parser.add_argument("--data", default=str(DATA), help="a photo folder, or digits-folder")
    parser.add_argument("--variants", nargs="+", default=["base"], help=f"of {', '.join(VARIANTS)}, joined by +")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--budgets", nargs="+", default=["5m", "15m", "30m"])
    parser.add_argument("--image-size", type=int, help="for every variant that does not set its own")
    parser.add_argument("--steps", type=int, default=10, help="speed: timed steps")
    parser.add_argument("--out", help="append the JSON lines to this file")
    args = parser.parse_args()
    {"ablate": ablate, "budget": budget, "speed": speed}[args.command](args)


if __name__ == "__main__":
    main()
