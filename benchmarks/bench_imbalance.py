"""Imbalanced folders (issue 22): balanced accuracy on a balanced held-out set of a model trained on
a 10:1 cats/dogs folder, with no option, --class-weights balanced and --sampler balanced.

The folders are symlinks under --root (nothing copied, nothing in the repository): from
../shared/data/cats-vs-dogs-2000, shuffled with a fixed seed, the first 900 cats and 90 dogs train
(`reslab train` holds out its own --val-split from them, imbalanced like the rest), and the next 100
cats and 100 dogs, never trained on, are the held-out set `reslab evaluate` scores as a whole folder.

    .venv/bin/python benchmarks/bench_imbalance.py --epochs 12 --image-size 64 --seeds 0 1 --out imbalance.jsonl

One JSON line per run: the variant, the seed, the training summary's validation figures and the
held-out eval.json's top-1, balanced accuracy, macro F1 and per-class recall; a table at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cats-vs-dogs-2000"
VARIANTS = {"none": [], "class-weights": ["--class-weights", "balanced"], "sampler": ["--sampler", "balanced"]}
TRAIN_COUNTS, HELDOUT_PER_CLASS = {"cats": 900, "dogs": 90}, 100


def make_folders(root: Path, photos: Path = PHOTOS) -> tuple[Path, Path]:
    """root/train (900 cats, 90 dogs) and root/heldout (100 of each, disjoint), as symlinks."""
    train, heldout = root / "train", root / "heldout"
    rng = np.random.default_rng(0)
    for name, n in TRAIN_COUNTS.items():
        files = sorted((photos / name).iterdir())
        files = [files[i] for i in rng.permutation(len(files))]
        for folder, chosen in ((train, files[:n]), (heldout, files[n:n + HELDOUT_PER_CLASS])):
            (folder / name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                link = folder / name / f.name
                if not link.exists():
                    link.symlink_to(f)
    return train, heldout


def reslab(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "reslab", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/reslab-imbalance", help="where the folders and runs go")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", default="64")
    parser.add_argument("--epochs", default="12")
    parser.add_argument("--val-split", default="0.1")
    parser.add_argument("--seeds", nargs="+", default=["0", "1"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="imbalance.jsonl")
    args = parser.parse_args()
    root = Path(args.root)
    train, heldout = make_folders(root)
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            run = root / "runs" / f"{variant}-e{args.epochs}-seed{seed}"
            start = time.perf_counter()
            if not (run / "summary.json").exists():
                reslab("train", "--data", str(train), "--data-dir", str(root / "cache"), "--model", args.model,
                       "--image-size", args.image_size, "--epochs", args.epochs, "--val-split", args.val_split,
                       "--seed", seed, "--out", str(run), "--quiet", *VARIANTS[variant])
            seconds = time.perf_counter() - start
            reslab("evaluate", str(run), "--data", str(heldout), "--data-dir", str(root / "cache"),
                   "--out", str(run / "eval-heldout"), "--top-losses", "0")
            summary = json.loads((run / "summary.json").read_text())
            scored = json.loads((run / "eval-heldout" / "eval.json").read_text())
            row = {"variant": variant, "seed": int(seed), "model": args.model, "image_size": int(args.image_size),
                   "epochs": int(args.epochs), "train_seconds": round(seconds, 1),
                   "val": {k: summary[k] for k in ("best_epoch", "best_val_acc", "balanced_accuracy", "macro_f1",
                                                   "best_by")},
                   "heldout": {"n": scored["n"], "top1": scored["top1"],
                               "balanced_accuracy": scored["balanced_accuracy"], "macro_f1": scored["macro_f1"],
                               "recall": {c: v["recall"] for c, v in scored["per_class"].items()}}}
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print("\n| variant | seed | held-out balanced acc | cat recall | dog recall | held-out macro F1 | "
          "val balanced acc (best epoch) | minutes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        h, v = r["heldout"], r["val"]
        print(f"| {r['variant']} | {r['seed']} | {h['balanced_accuracy']:.3f} | {h['recall']['cats']:.2f} | "
              f"{h['recall']['dogs']:.2f} | {h['macro_f1']:.3f} | {v['balanced_accuracy']:.3f} ({v['best_epoch']}) | "
              f"{r['train_seconds'] / 60:.1f} |")


if __name__ == "__main__":
    main()
