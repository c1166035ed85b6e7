"""Does CIFAR-10 pretraining help on 400 cats and dogs at 32x32? (issue 5's closing measurement)

Fine-tunes the third-party CIFAR-10 ResNet-56 (../shared/data/pretrained-cifar10) on
../shared/data/cats-vs-dogs-400 and trains the same net from scratch, with the same recipe,
epochs, split and seeds, through reslab's own trainer; also a linear probe (--freeze layer3:
everything but the new head frozen). Prints one JSON object; minutes of CPU, so not a test.

    .venv/bin/python benchmarks/bench_transfer.py --epochs 15 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "cats-vs-dogs-400"))
    parser.add_argument("--weights", default=str(SHARED / "pretrained-cifar10" / "resnet56-4bfd9763.th"))
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    from reslab.hardware import describe
    from reslab.train import TrainConfig, train

    variants = {
        "scratch": {},
        "finetune": {"pretrained": args.weights},
        "linear_probe": {"pretrained": args.weights, "freeze": "layer3"},
    }
    results = {"model": args.model, "data": args.data, "weights": args.weights, "epochs": args.epochs,
               "image_size": 32, "val_split": 0.2, "batch_size": args.batch_size, "recipe": "fast",
               "hardware": describe(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, extra in variants.items():
                start = time.perf_counter()
                summary = train(TrainConfig(model=args.model, data=args.data, epochs=args.epochs, image_size=32,
                                            val_split=0.2, batch_size=args.batch_size, seed=seed,
                                            out=f"{tmp}/{name}-{seed}", quiet=True, **extra))
                row = {"variant": name, "seed": seed, "best_val_acc": summary["best_val_acc"],
                       "final_val_acc": summary["final_val_acc"], "trainable_params": summary["trainable_params"],
                       "frozen_params": summary["frozen_params"],
                       "seconds": round(time.perf_counter() - start, 1)}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    for name in variants:
        finals = [r["final_val_acc"] for r in results["runs"] if r["variant"] == name]
        results[f"{name}_mean_final_val_acc"] = sum(finals) / len(finals)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        from reslab.io import write_text

        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
