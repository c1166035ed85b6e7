"""Fine-tuning on the course's own task (issue 13): from scratch, plain fine-tuning and --recipe finetune.

resnet56 at 32 px on ../shared/data/cats-vs-dogs-2000 (`--val-split 0.1`: 1,800 training and 200
validation photos, stratified by the seed), three ways, through reslab's own trainer:
- scratch: the fast recipe, random weights;
- plain: the fast recipe from `resnet56.akamaster_cifar10` (every layer at the fast recipe's lr);
- finetune: `--recipe finetune` from the same weights (head first, then discriminative lrs).
The catalog file must be in $TORCH_HOME/hub/checkpoints (or reachable). Prints one JSON line a run
and a summary; minutes of CPU, so not a test.

    TORCH_HOME=/tmp/th .venv/bin/python benchmarks/bench_transfer.py --seeds 0 1
    .venv/bin/python benchmarks/bench_transfer.py --variants finetune --set lr=0.05 layer_decay=0.3  # a sweep point
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repo
WEIGHTS = "resnet56.akamaster_cifar10"
VARIANTS = {
    "scratch": {"recipe": "fast"},
    "plain": {"recipe": "fast", "pretrained": WEIGHTS},
    "finetune": {"recipe": "finetune", "pretrained": WEIGHTS},
}


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "cats-vs-dogs-2000"))
    parser.add_argument("--epochs", type=int, default=None, help="default: the finetune recipe's, for all three")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    from reslab.hardware import describe
    from reslab.train import TrainConfig, train
    from reslab.train.config import FINETUNE_EPOCHS

    epochs = args.epochs or FINETUNE_EPOCHS
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    results = {"model": "resnet56", "data": args.data, "weights": WEIGHTS, "epochs": epochs, "image_size": 32,
               "val_split": 0.1, "overrides": overrides, "hardware": describe(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in args.variants:
                start = time.perf_counter()
                summary = train(TrainConfig(model="resnet56", data=args.data, epochs=epochs, image_size=32,
                                            val_split=0.1, seed=seed, out=f"{tmp}/{name}-{seed}", quiet=True,
                                            **{**VARIANTS[name], **overrides}))
                minutes = round((time.perf_counter() - start) / 60, 2)
                row = {"variant": name, "seed": seed, "best_val_acc": summary["best_val_acc"],
                       "final_val_acc": summary["final_val_acc"], "minutes": minutes}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    for name in args.variants:
        finals = [r["final_val_acc"] for r in results["runs"] if r["variant"] == name]
        results[f"{name}_mean_final_val_acc"] = round(sum(finals) / len(finals), 4)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        from reslab.io import write_text

        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
