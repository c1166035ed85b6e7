"""The learning-rate finder against the recipe's lr (issue 22): a training run at each, two seeds, three tasks.

For every task and seed, `reslab train` as a user would type it, once at the recipe's lr and once
with `--lr-find` (the range test on the run's own loader, then training at its suggestion), with the
same fixed --epochs; one JSON line a run, then a Markdown table. Minutes of CPU: not a test.

- photos: ../shared/data/cats-vs-dogs-2000 from scratch, resnet18 at 64 px (the photo-folder
  defaults otherwise: lr 0.05, TrivialAugment, label smoothing), --val-split 0.2;
- cifar: a 5,000-image subset (500 a class, the first of each class folder) of the CIFAR-10 training
  JPEGs, as a folder of symlinks built outside the repository; the photo-folder defaults for small
  images (resnet20 at 32 px, lr 0.05), --val-split 0.2;
- finetune: --recipe finetune from ../shared/data/pretrained-cifar10/resnet20-12fca82f.th on the
  cats and dogs at 32 px, --val-split 0.2.

    flock /tmp/reslab-cpu.lock .venv/bin/python benchmarks/bench_lr_find.py --tasks photos --seeds 0 1 \
        --out /tmp/lrf-bench/results.jsonl --keep /tmp/lrf-bench/curves
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repo
CIFAR_TAR = SHARED / "cifar10-train-jpg.tar.gz"
CIFAR_DIR = Path("/tmp/cifar10-jpg")  # the whole training set, extracted once (other benchmarks share it)
CIFAR_SUBSET = Path("/tmp/cifar10-jpg-5k")
PER_CLASS = 500

TASKS = {
    "photos": dict(data=str(SHARED / "cats-vs-dogs-2000"), model="resnet18", image_size=64, epochs=8,
                   val_split=0.2),
    "cifar": dict(data=str(CIFAR_SUBSET), model="resnet20", epochs=10, val_split=0.2),
    "finetune": dict(data=str(SHARED / "cats-vs-dogs-2000"), model="resnet20", image_size=32, epochs=8,
                     val_split=0.2, recipe="finetune",
                     pretrained=str(SHARED / "pretrained-cifar10" / "resnet20-12fca82f.th")),
}


def cifar_subset() -> Path:
    """CIFAR_SUBSET: PER_CLASS symlinks a class into the extracted training set (extracted if absent)."""
    if not (CIFAR_DIR / "train").is_dir():
        with open("/tmp/cifar-extract.lock", "w") as lock:  # another benchmark may be extracting it
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (CIFAR_DIR / "train").is_dir():
                CIFAR_DIR.mkdir(parents=True, exist_ok=True)
                subprocess.run(["tar", "-xzf", str(CIFAR_TAR), "-C", str(CIFAR_DIR)], check=True)
    for source in sorted((CIFAR_DIR / "train").iterdir()):
        target = CIFAR_SUBSET / source.name
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted(source.glob("*.jpg"))[:PER_CLASS]:
            link = target / image.name
            if not link.exists():
                link.symlink_to(image)
    return CIFAR_SUBSET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", help="append the JSON lines here too")
    parser.add_argument("--lr-from", nargs="+", default=["recipe", "finder"], choices=["recipe", "finder"],
                        help="which runs: at the recipe's lr, with --lr-find")
    parser.add_argument("--note", help="recorded in every row (e.g. what changed in the code)")
    parser.add_argument("--rule", default=None, help="the finder's rule (default: reslab's default, minimum)")
    parser.add_argument("--keep", help="copy each finder run's lr_find.json and lr_find.png into this folder")
    args = parser.parse_args()

    from reslab.hardware import describe
    from reslab.train import TrainConfig, train

    if "cifar" in args.tasks:
        cifar_subset()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            for seed in args.seeds:
                for finder in [lr_from == "finder" for lr_from in args.lr_from]:
                    out = Path(tmp) / f"{task}-{seed}-{'find' if finder else 'recipe'}"
                    rule = (args.rule or True) if finder else False
                    cfg = TrainConfig(**TASKS[task], seed=seed, lr_find=rule, out=str(out), quiet=True,
                                      data_dir=str(Path(tmp) / "cache"))
                    start = time.perf_counter()
                    summary = train(cfg)
                    record = json.loads((out / "config.json").read_text())
                    found = record.get("lr_find") or {}
                    suggestions = json.loads((out / "lr_find.json").read_text())["suggestions"] if finder else None
                    if finder and args.keep:
                        Path(args.keep).mkdir(parents=True, exist_ok=True)
                        for name in ("lr_find.json", "lr_find.png"):
                            shutil.copy(out / name, Path(args.keep) / f"{task}-{seed}-{name}")
                    row = {"task": task, "seed": seed, "lr_from": "finder" if finder else "recipe",
                           "lr": record["config"]["lr"], "rule": found.get("rule"),
                           "suggestions": suggestions,
                           "finder_steps": found.get("steps"), "finder_stopped": found.get("stopped"),
                           "best_val_acc": summary["best_val_acc"], "final_val_acc": summary["final_val_acc"],
                           "epochs": summary["epochs"], "minutes": round((time.perf_counter() - start) / 60, 2),
                           "options": TASKS[task], "note": args.note, "hardware": describe(),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                    rows.append(row)
                    line = json.dumps(row)
                    print(line, flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(line + "\n")
    print("\n| task | seed | lr from | lr | best val acc | final val acc | minutes |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['task']} | {r['seed']} | {r['lr_from']}{' (' + r['rule'] + ')' if r['rule'] else ''} | "
              f"{r['lr']:.3g} | {r['best_val_acc']:.3f} | {r['final_val_acc']:.3f} | {r['minutes']:.1f} |")


if __name__ == "__main__":
    main()
