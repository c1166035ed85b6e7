"""int8 with reduce_range (the settings of an x86 CPU without VNNI): per-channel against per-tensor
weight scales, on the CIFAR-10 catalog nets and real photos (issue 16).

    TORCH_HOME=/tmp/th .venv/bin/python benchmarks/bench_int8_reduce_range.py resnet20.akamaster_cifar10

512 of the 2,000 cats-vs-dogs photos are set aside for calibration (the first 128 of them calibrate),
the other 1,488 are checked; prints the top-1 change against fp32 in ONNX Runtime and OpenVINO.
Figures in benchmarks/RESULTS.md, "int8 accuracy".
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from bench_int8 import CATS_DOGS, _predictions
    from reslab.evaluate import load_eval_set
    from reslab.inference.export import export_onnx
    from reslab.inference.quantize import Int8Settings, calibration_record, normalized_batches, quantize_onnx
    from reslab.weights.source import load_source

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a catalog name or weights file of a CIFAR-10 net")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    model, meta = load_source(args.source)
    photos = load_eval_set(str(CATS_DOGS), meta)
    order = torch.randperm(len(photos.labels), generator=torch.Generator().manual_seed(0))
    calibration, rest = photos.images[order[:128].sort().values], order[512:].sort().values
    images, labels = photos.images[rest], photos.labels[rest]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, meta, Path(tmp) / "fp32.onnx")
        for backend in ("onnxruntime", "openvino"):
            a = _predictions(fp32, images, meta, backend)
            print(f"{backend}: n {len(labels)} fp32 top-1 {float((a == labels).float().mean()):.4f}", flush=True)
            for per_channel in (True, False):
                settings = Int8Settings(reduce_range=True, per_channel=per_channel)
                int8 = quantize_onnx(fp32, Path(tmp) / f"{per_channel}.onnx", normalized_batches(calibration, meta),
                                     meta, settings, calibration_record(calibration, str(CATS_DOGS)))
                b = _predictions(int8, images, meta, backend)
                change = float((b == labels).float().mean() - (a == labels).float().mean())
                print(f"  reduce_range, {'per-channel' if per_channel else 'per-tensor'} weights: change "
                      f"{change:+.4f}", flush=True)


if __name__ == "__main__":
    main()
