"""`reslab export RUN_OR_CKPT --format onnx|openvino [--int8 --calibration DATA]`: the BN-folded graph,
checked against PyTorch; with --int8 statically quantized and checked against fp32 on held-out images."""

from __future__ import annotations

import argparse

from reslab.cli.options import add_inference_options
from reslab.errors import ReslabError

INT8_ONLY = ("calibration", "calibration_images", "eval_data", "max_drop", "force", "reduce_range")


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CKPT",
                        help="a run directory (its best weights) or a weights file; with --int8 also catalog weights "
                             "(MODEL.TAG) or a foreign checkpoint (--model)")
    parser.add_argument("--format", required=True, choices=["onnx", "openvino"], help="onnx or openvino")
    parser.add_argument("--out", help="output file (default: beside the weights, .onnx or .xml + .bin; -int8 "
                                      "before the suffix with --int8)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    add_inference_options(parser, "model", "classes")
    int8 = parser.add_argument_group("int8 (post-training static quantization, ONNX Runtime QDQ)")
    int8.add_argument("--int8", action="store_true", help="quantize: int8 weights per channel, uint8 activations")
    add_inference_options(int8, "calibration", "calibration_images",
                          calibration="data whose training images calibrate the activation ranges (a folder, "
                                      "digits, cifar10...): required with --int8")
    int8.add_argument("--eval-data", metavar="DATA",
                      help="labelled data to check int8 against fp32 on (default: the held-out part of "
                           "--calibration: its test/val split, or the images of a class folder not calibrated on)")
    add_inference_options(int8, "max_drop")
    int8.add_argument("--force", action="store_true", help="write the int8 model even when top-1 dropped more")
    int8.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=None,
                      help="7-bit weights (default: only on an x86 CPU without VNNI, where 8-bit ones can saturate; "
                           "give it for a file meant for such CPUs)")
    parser.add_argument("--data-dir", help="cache folder for downloads and decoded folders")


def run(args) -> int:
    if args.int8:
        return _run_int8(args)
    given = [f"--{name.replace('_', '-')}" for name in INT8_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise ReslabError(f"{', '.join(given)}: for an int8 export only; add --int8")
    from reslab.inference.export import TOLERANCE, export

    result = export(args.source, args.format, args.out, opset=args.opset, model_name=args.model, classes=args.classes)
    print(f"wrote {result.path} ({result.format}, dynamic batch, BatchNorm folded)")
    if result.max_abs_diff is None:
        print("not checked: install onnxruntime or openvino to compare with PyTorch")
    else:
        print(f"max abs difference against PyTorch ({result.checked_with}, fp32): {result.max_abs_diff:.3g} "
              f"(tolerance {TOLERANCE:g})")
    return 0


def _run_int8(args) -> int:
    from pathlib import Path

    from reslab.inference.export import FORMATS
    from reslab.inference.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MAX_DROP, export_int8
    from reslab.weights.source import load_source

    if not args.calibration:
        raise ReslabError("--int8 needs --calibration DATA: images like the ones the model will see (its training "
                          "data, e.g. the run's folder or digits)")
    if args.opset != 17:
        raise ReslabError(f"--opset {args.opset}: the int8 graph is quantized from the default opset (17); "
                          "drop --opset")
    count = args.calibration_images or DEFAULT_CALIBRATION_IMAGES
    max_drop = DEFAULT_MAX_DROP if args.max_drop is None else args.max_drop
    model, meta = load_source(args.source, model=args.model, classes=args.classes)
    calibration, holdout, labels, described = _int8_images(args, meta, count)
    source = Path(args.source)
    if args.out is not None:
        out = Path(args.out)
    elif source.exists():
        weights = source / "best.safetensors" if source.is_dir() else source
        out = weights.with_name(f"{weights.stem}-int8{FORMATS[args.format]}")
    else:  # catalog weights or a URL: the current folder
        from reslab.train.state import safe_name

        out = Path(f"{safe_name(str(args.source))}-int8{FORMATS[args.format]}")
    result = export_int8(model, meta, args.format, out, calibration=calibration, holdout=holdout, labels=labels,
                         data=args.calibration, max_drop=max_drop, force=args.force, reduce_range=args.reduce_range)
    report = result.report
    settings = report.settings
    comparison = (f"top-1 agreement with fp32 {report.agreement:.4f}; top-1 fp32 {report.fp32_top1:.4f} -> int8 "
                  f"{report.int8_top1:.4f} ({report.int8_top1 - report.fp32_top1:+.4f}; --max-drop {max_drop:g})")
    if result.path is None:
        raise ReslabError(f"int8 top-1 dropped by {report.drop:.4f} on {described} ({comparison}), more than "
                          f"--max-drop {max_drop:g}: nothing written; calibrate on other or more images "
                          "(--calibration-images), or --force to write it anyway")
    print(f"wrote {result.path} ({result.format} int8: {settings['format']}, per-channel int8 weights"
          f"{' (7-bit: reduce_range)' if settings['reduce_range'] else ''}, uint8 activations, BatchNorm folded)")
    print(f"calibrated on {report.calibration_images} images of {args.calibration}")
    print(f"checked on {described}: {comparison}")
    if report.drop > max_drop:
        print(f"warning: the drop is above --max-drop {max_drop:g}; written because of --force")
    return 0


def _int8_images(args, meta, count: int):
    """(calibration images, held-out images, their labels, a description of the held-out set).

    Calibration comes from the training split of --calibration; the check runs on --eval-data, else on
    the held-out part of --calibration: its test (or val) split, or, for a folder of class subfolders
    evaluated whole, the images of it not drawn for calibration.
    """
    import torch

    from reslab.evaluate import load_eval_set
    from reslab.inference.quantize import calibration_images

    eval_set = load_eval_set(args.eval_data or args.calibration, meta, data_dir=args.data_dir)
    if args.eval_data is None and eval_set.split == "all":
        count = min(count, len(eval_set.labels) // 2)
        order = torch.randperm(len(eval_set.labels), generator=torch.Generator().manual_seed(0))
        calibration, rest = order[:count].sort().values, order[count:].sort().values
        return (eval_set.images[calibration], eval_set.images[rest], eval_set.labels[rest],
                f"{len(rest)} images of {args.calibration} not calibrated on")
    calibration = calibration_images(args.calibration, meta, count, data_dir=args.data_dir)
    return (calibration, eval_set.images, eval_set.labels,
            f"{len(eval_set.labels)} images of {args.eval_data or args.calibration} ({eval_set.split})")
