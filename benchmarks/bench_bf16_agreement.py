"""bf16 against fp32 top-1 on real validation images (issue 7, point 3): the fraction of images where
the bf16 fast path's prediction equals the fp32 one, for two models trained here with reslab:

- resnet20 on the embedded digits (val + test splits), 32 px;
- resnet18 on /work/shared/data/cats-vs-dogs-400 (its seeded 20% validation split), 64 px.

    .venv/bin/python benchmarks/bench_bf16_agreement.py --out benchmarks/results-bf16.json

bf16 is forced (`precision="bf16"`), whatever the hardware: on a CPU without native bf16 it is slow
but numerically the same. Both paths are reslab's torch backend (BN folded); fp32 is the reference.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

CATS_DOGS = Path("/work/shared/data/cats-vs-dogs-400")


def agreement(run_dir: Path, data: str, image_size: int) -> dict:
    from reslab.data import load_data
    from reslab.infer import Predictor

    fp32 = Predictor(run_dir, backend="torch", precision="fp32")
    bf16 = Predictor(run_dir, backend="torch", precision="bf16")
    bundle = load_data(data, image_size=image_size, quiet=True)
    held_out = [s for s in (bundle.val, bundle.test) if s is not None]
    images = torch.cat([s.images for s in held_out])
    labels = torch.cat([s.labels for s in held_out])
    a, b = fp32.logits(images).argmax(1), bf16.logits(images).argmax(1)
    return {"n": len(labels), "agreement": float((a == b).float().mean()),
            "fp32_top1": float((a == labels).float().mean()), "bf16_top1": float((b == labels).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results-bf16.json")
    parser.add_argument("--runs", help="folder for the training runs (default: a temporary folder)")
    parser.add_argument("--epochs-digits", type=int, default=8)
    parser.add_argument("--epochs-cats-dogs", type=int, default=6)
    args = parser.parse_args()
    from reslab.train.config import TrainConfig
    from reslab.train.loop import train

    runs = Path(args.runs or tempfile.mkdtemp(prefix="reslab-bf16-"))
    jobs = [("resnet20", "digits", 32, args.epochs_digits)]
    if CATS_DOGS.is_dir():
        jobs.append(("resnet18", str(CATS_DOGS), 64, args.epochs_cats_dogs))
    results = []
    for model, data, size, epochs in jobs:
        start = time.time()
        summary = train(TrainConfig(model=model, data=data, image_size=size, epochs=epochs, quiet=True,
                                    out=str(runs / f"{model}-{Path(data).name}")))
        row = {"model": model, "data": data, "image_size": size, "epochs": epochs,
               "best_val_acc": summary.get("best_val_acc"), **agreement(Path(summary["run_dir"]), data, size),
               "seconds": time.time() - start}
        print(json.dumps(row), flush=True)
        results.append(row)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
