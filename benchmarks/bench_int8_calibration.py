"""int8 calibration choices on a fine-tuned run's held-out photos (issue 16), ONNX Runtime, one line each.

    reslab train --data /work/shared/data/cats-vs-dogs-2000 --val-split 0.5 \\
        --pretrained resnet56.akamaster_cifar10 --recipe finetune --out /tmp/ft56-half
    .venv/bin/python benchmarks/bench_int8_calibration.py /tmp/ft56-half

Quantizes the run's model with MinMax on 128 and 512 training images, Percentile, Entropy, the
first convolution and classifier kept fp32, and reduce_range with per-channel and per-tensor
weights; prints agreement with fp32 and the top-1 change on the run's validation split. Figures
in benchmarks/RESULTS.md, "int8 accuracy".
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# name, calibration images, ONNX Runtime calibration method, reduce_range, fp32 ends, per-channel weights
VARIANTS = [("minmax128", 128, "MinMax", False, False, True), ("minmax512", 512, "MinMax", False, False, True),
            ("percentile128", 128, "Percentile", False, False, True),
            ("entropy128", 128, "Entropy", False, False, True),
            ("minmax128-ends", 128, "MinMax", False, True, True), ("minmax128-rr", 128, "MinMax", True, False, True),
            ("minmax128-rr-tensor", 128, "MinMax", True, False, False)]


def main() -> None:
    import onnxruntime.quantization as ort_quantization
    from onnxruntime.quantization import CalibrationMethod

    from bench_int8 import _predictions
    from reslab.data import load_data
    from reslab.inference.export import export_onnx
    from reslab.inference.quantize import (
        Int8Settings,
        calibration_images,
        calibration_record,
        normalized_batches,
        pick,
        quantize_onnx,
    )
    from reslab.weights.source import load_source

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run fine-tuned on a photo folder with a validation split")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    model, meta = load_source(args.run)
    extra, pre = meta.extra, meta.preprocessing
    bundle = load_data(extra["data"], image_size=pre.get("resize_size") or pre["image_size"],
                       val_split=extra["val_split"], seed=extra["seed"], quiet=True)
    val, labels = pick(bundle.val.images, len(bundle.val.images), pre["image_size"]), bundle.val.labels
    original = ort_quantization.quantize_static
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, meta, Path(tmp) / "fp32.onnx")
        a = _predictions(fp32, val, meta, "onnxruntime")
        print(f"n {len(labels)} fp32 top-1 {float((a == labels).float().mean()):.4f}", flush=True)
        for name, count, method, reduce_range, ends, per_channel in VARIANTS:
            def with_method(*positional, method=method, **options):  # quantize_onnx's call, another calibration
                return original(*positional, **{**options, "calibrate_method": getattr(CalibrationMethod, method)})

            ort_quantization.quantize_static = with_method
            try:
                images = calibration_images(extra["data"], meta, count)
                int8 = quantize_onnx(fp32, Path(tmp) / f"{name}.onnx", normalized_batches(images, meta), meta,
                                     Int8Settings(reduce_range=reduce_range, fp32_ends=ends,
                                                  per_channel=per_channel),
                                     calibration_record(images, extra["data"]))
            finally:
                ort_quantization.quantize_static = original
            b = _predictions(int8, val, meta, "onnxruntime")
            top1 = float((b == labels).float().mean())
            print(f"{name:<15} agreement {float((a == b).float().mean()):.4f} int8 top-1 {top1:.4f} "
                  f"change {top1 - float((a == labels).float().mean()):+.4f}", flush=True)


if __name__ == "__main__":
    main()
