"""int8 against fp32 (issue 16): speed on ResNet-50 and top-1 on real images, with the CPU flags.

    .venv/bin/python benchmarks/bench_int8.py --run /tmp/r20 --out benchmarks/results-int8.json

1. Speed: ResNet-50 inference at 224 px, batch 32 and batch 1, fp32 and int8 on torch (fp32 only:
   reslab's torch backend has no int8 path), ONNX Runtime and OpenVINO, plus bf16 where the CPU has
   it natively. Rows are `reslab.bench.run_bench` (what `reslab bench --json` prints: GFLOP/s and
   the fraction of the measured matrix-product peak at that precision). The int8 graph is what
   `--precision int8` builds (reslab.inference.quantize, settings for this CPU).
2. Settings: the same ResNet-50 at batch 32 quantized three ways (uint8 or int8 activations,
   reduce_range on or off), each run in ONNX Runtime and OpenVINO: why reslab's choice is its choice.
3. Accuracy: int8 top-1 against fp32 on held-out real images, ONNX Runtime and OpenVINO running the
   same QDQ graph, reduce_range off and on:
   - a resnet20 trained on the embedded digits (--run, e.g. `reslab train --epochs 6 --out /tmp/r20`;
     trained here for 6 epochs when not given): calibrated on 128 training images, checked on the
     test split;
   - the catalog CIFAR-10 resnet20 and resnet56 (akamaster; $TORCH_HOME must hold their files) on the
     2,000 photos of /work/shared/data/cats-vs-dogs-2000: calibrated on 128 of them, checked on the
     other 1,872 (the cat/dog subset of the 10 CIFAR classes, top-1 over all 10), as
     `reslab export --int8 --calibration <that folder>` splits a folder of class subfolders.

Prints markdown tables for benchmarks/RESULTS.md and writes every row to --out. Minutes on an idle
2-core machine; far longer under load (the load average is recorded at start and end).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from reslab.bench import BenchConfig, run_bench, time_steps
from reslab.hardware import bf16_is_fast, describe

CATS_DOGS = Path("/work/shared/data/cats-vs-dogs-2000")
CALIBRATION = 128


def speed(args) -> list[dict]:
    from reslab.inference import installed_backends

    rows = []
    installed = installed_backends()
    for batch in (32, 1):
        base = BenchConfig(model="resnet50", mode="infer", batch_size=batch, seconds=args.seconds, warmup=args.warmup,
                           threads=args.threads)
        wanted = [(b, "fp32") for b in installed] + [(b, "int8") for b in ("onnxruntime", "openvino") if b in installed]
        if bf16_is_fast("cpu"):
            wanted += [(b, "bf16") for b in ("torch", "openvino") if b in installed]
        for backend, precision in wanted:
            result = run_bench(dataclasses.replace(base, backend=backend, precision=precision))
            print(f"  batch {batch:>2} {backend:<12} {precision:<5} {result['images_per_second']:8.1f} img/s "
                  f"{result['ms_per_batch']:9.1f} ms/batch {result['gflops_per_second']:7.1f} GFLOP/s "
                  f"({_percent(result['peak_fraction'])} of {result['peak_precision']} peak)", flush=True)
            rows.append(result)
    return rows


def settings_rows(args) -> list[dict]:
    """ResNet-50 batch 32 quantized with each candidate setting, timed in both runtimes."""
    from reslab.bench import _calibration_images, _meta, _model
    from reslab.inference.backends import OnnxRuntimeRunner, OpenVinoRunner, installed_backends
    from reslab.inference.export import export_onnx
    from reslab.inference.quantize import Int8Settings, calibration_record, normalized_batches, quantize_onnx

    cfg = BenchConfig(model="resnet50", mode="infer", batch_size=32, threads=args.threads).resolve()
    model, meta = _model(cfg), _meta(cfg)
    calibration = _calibration_images(cfg)
    x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    threads = args.threads or torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, meta, Path(tmp) / "fp32.onnx")
        for activations, reduce_range, ends in (("uint8", False, False), ("uint8", True, False), ("uint8", True, True),
                                                ("int8", False, False)):
            settings = Int8Settings(reduce_range=reduce_range, activations=activations, fp32_ends=ends)
            path = quantize_onnx(fp32, Path(tmp) / f"{activations}-{reduce_range}-{ends}.onnx",
                                 normalized_batches(calibration, meta), meta, settings,
                                 calibration_record(calibration, "digits"))
            for backend in ("onnxruntime", "openvino"):
                if backend not in installed_backends():
                    continue
                runner = OnnxRuntimeRunner(path, threads=threads) if backend == "onnxruntime" else \
                    OpenVinoRunner(path, threads=threads)
                times = time_steps(lambda r=runner: r(x), args.warmup, args.seconds, lambda: None)
                row = {"activations": activations, "weights": "int8", "reduce_range": reduce_range, "fp32_ends": ends,
                       "backend": backend, "images_per_second": 32 * len(times) / sum(times)}
                print(f"  u8/s8 choice: activations {activations:<5} reduce_range {reduce_range!s:<5} {backend:<12} "
                      f"{row['images_per_second']:7.1f} img/s", flush=True)
                rows.append(row)
    return rows


def _predictions(path: Path, images: torch.Tensor, meta, backend: str) -> torch.Tensor:
    from reslab.inference.backends import OnnxRuntimeRunner, OpenVinoRunner
    from reslab.inference.quantize import normalized_batches

    runner = OnnxRuntimeRunner(path) if backend == "onnxruntime" else OpenVinoRunner(path)
    return torch.cat([runner(torch.from_numpy(b)).argmax(1) for b in normalized_batches(images, meta, 64)])


def accuracy_case(name: str, source, data: str, calibration, holdout, labels) -> list[dict]:
    from reslab.inference import installed_backends
    from reslab.inference.export import export_onnx
    from reslab.inference.quantize import Int8Settings, calibration_record, normalized_batches, quantize_onnx
    from reslab.weights.source import load_source

    model, meta = load_source(source)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, meta, Path(tmp) / "fp32.onnx")
        # This CPU's settings, the AVX2 settings (reduce_range), and those with the ends kept fp32.
        for reduce_range, fp32_ends in ((False, False), (True, False), (True, True)):
            settings = Int8Settings(reduce_range=reduce_range, fp32_ends=fp32_ends)
            int8 = quantize_onnx(fp32, Path(tmp) / "int8.onnx", normalized_batches(calibration, meta), meta, settings,
                                 calibration_record(calibration, data))
            for backend in [b for b in ("onnxruntime", "openvino") if b in installed_backends()]:
                a = _predictions(fp32, holdout, meta, backend)
                b = _predictions(int8, holdout, meta, backend)
                row = {"model": name, "data": data, "image_size": meta.preprocessing["image_size"],
                       "calibration_images": len(calibration), "n": len(labels), "reduce_range": reduce_range,
                       "fp32_ends": fp32_ends,
                       "backend": backend, "agreement": float((a == b).float().mean()),
                       "fp32_top1": float((a == labels).float().mean()),
                       "int8_top1": float((b == labels).float().mean())}
                row["drop"] = row["fp32_top1"] - row["int8_top1"]
                print(f"  {name:<30} {backend:<12} reduce_range {reduce_range!s:<5} fp32 ends {fp32_ends!s:<5} "
                      f"n {row['n']:5d} agreement "
                      f"{row['agreement']:.4f} fp32 {row['fp32_top1']:.4f} int8 {row['int8_top1']:.4f} "
                      f"drop {row['drop']:+.4f}", flush=True)
                rows.append(row)
    return rows


def accuracy(args) -> list[dict]:
    from reslab.evaluate import load_eval_set
    from reslab.inference.quantize import calibration_images
    from reslab.weights.source import load_source

    rows = []
    run = Path(args.run) if args.run else _train_digits(Path(tempfile.mkdtemp(prefix="bench-int8-")))
    _, meta = load_source(run)
    test = load_eval_set("digits", meta)
    rows += accuracy_case("resnet20 trained on digits", run, "digits", calibration_images("digits", meta, CALIBRATION),
                          test.images, test.labels)
    if args.finetuned:  # the CIFAR-10 resnet56 fine-tuned on the photos: checked on its validation photos
        from reslab.data import load_data
        from reslab.inference.quantize import pick

        _, meta = load_source(args.finetuned)
        data, extra, pre = meta.extra["data"], meta.extra, meta.preprocessing
        bundle = load_data(data, image_size=pre.get("resize_size") or pre["image_size"], val_split=extra["val_split"],
                           seed=extra["seed"], quiet=True)
        val = pick(bundle.val.images, len(bundle.val.images), pre["image_size"])
        rows += accuracy_case(f"{meta.model} fine-tuned on {Path(data).name}", args.finetuned, data,
                              calibration_images(data, meta, CALIBRATION), val, bundle.val.labels)
    if CATS_DOGS.is_dir():
        for name in ("resnet20.akamaster_cifar10", "resnet56.akamaster_cifar10"):
            try:
                _, meta = load_source(name)
            except Exception as err:  # no network and no file in $TORCH_HOME
                print(f"  {name}: skipped ({str(err).splitlines()[0]})")
                continue
            photos = load_eval_set(str(CATS_DOGS), meta)
            order = torch.randperm(len(photos.labels), generator=torch.Generator().manual_seed(0))
            chosen, rest = order[:CALIBRATION].sort().values, order[CALIBRATION:].sort().values
            rows += accuracy_case(name, name, str(CATS_DOGS), photos.images[chosen], photos.images[rest],
                                  photos.labels[rest])
    return rows


def _train_digits(folder: Path) -> Path:
    from reslab.train.config import TrainConfig
    from reslab.train.loop import train

    out = folder / "r20"
    print(f"  training resnet20 on digits, 6 epochs -> {out}", flush=True)
    train(TrainConfig(epochs=6, out=str(out), quiet=True))
    return out


def _percent(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def tables(record: dict) -> str:
    """The markdown of RESULTS.md's int8 tables (those whose rows were measured)."""
    lines = []
    if record["speed"]:
        lines += ["| ResNet-50, 224 px | batch 32 img/s | of peak | batch 1 ms | of peak |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        by = {(r["backend"], r["precision"], r["batch_size"]): r for r in record["speed"]}
        for backend, precision in dict.fromkeys((r["backend"], r["precision"]) for r in record["speed"]):
            b32, b1 = by[(backend, precision, 32)], by[(backend, precision, 1)]
            lines.append(f"| {backend} {precision} | {b32['images_per_second']:.1f} | {_percent(b32['peak_fraction'])} "
                         f"| {b1['ms_per_batch']:.1f} | {_percent(b1['peak_fraction'])} |")
    if record["settings"]:
        lines += ["", "| quantized as (batch 32) | ONNX Runtime img/s | OpenVINO img/s |", "| --- | ---: | ---: |"]
        by = {(r["activations"], r["reduce_range"], r.get("fp32_ends"), r["backend"]): r["images_per_second"]
              for r in record["settings"]}
        for act, reduce_range, ends in dict.fromkeys(k[:3] for k in by):
            cells = [f"{by[(act, reduce_range, ends, b)]:.1f}" if (act, reduce_range, ends, b) in by else "-"
                     for b in ("onnxruntime", "openvino")]
            lines.append(f"| {act} activations, int8 weights{', reduce_range' if reduce_range else ''}"
                         f"{', first conv and classifier fp32' if ends else ''} | {' | '.join(cells)} |")
    if record["accuracy"]:
        lines += ["", "| model | held out | reduce_range | fp32 ends | runtime | agreement | fp32 top-1 | int8 top-1 | "
                  "change |", "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in record["accuracy"]:
            lines.append(f"| {r['model']} | {Path(r['data']).name} ({r['n']}) | {'yes' if r['reduce_range'] else 'no'}"
                         f" | {'yes' if r.get('fp32_ends') else 'no'}"
                         f" | {r['backend']} | {r['agreement']:.4f} | {r['fp32_top1']:.4f} | {r['int8_top1']:.4f} | "
                         f"{r['int8_top1'] - r['fp32_top1']:+.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results-int8.json")
    parser.add_argument("--run", help="a resnet20 run trained on digits (default: train one for 6 epochs)")
    parser.add_argument("--finetuned", help="a run fine-tuned from resnet56.akamaster_cifar10 on a photo folder, e.g. "
                        "`reslab train --pretrained resnet56.akamaster_cifar10 --recipe finetune --data "
                        "cats-vs-dogs-2000 --val-split 0.1`: checked on its validation photos")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed window per row (default 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs a warning per tensor it leaves alone
    record = {"date": datetime.date.today().isoformat(), "hardware": describe(), "load_start": os.getloadavg(),
              "command": "benchmarks/bench_int8.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
              "speed": [], "settings": [], "accuracy": []}
    print(f"CPU flags: {' '.join(record['hardware']['cpu_flags'])}; VNNI {record['hardware']['cpu_int8_vnni']}, "
          f"native bf16 {record['hardware']['cpu_bf16_native']}; load {record['load_start'][0]:.1f}", flush=True)
    start = time.time()
    if not args.skip_speed:
        record["speed"] = speed(args)
        record["settings"] = settings_rows(args)
    if not args.skip_accuracy:
        record["accuracy"] = accuracy(args)
    record["load_end"] = os.getloadavg()
    record["wall_seconds"] = time.time() - start
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(tables(record))
    print(f"load average at start / end: {record['load_start'][0]:.1f} / {record['load_end'][0]:.1f}; "
          f"{record['wall_seconds']:.0f} s; -> {args.out}")


if __name__ == "__main__":
    main()
