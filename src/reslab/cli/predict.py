"""`reslab predict RUN_OR_CKPT IMAGE...`: top-k class names with probabilities."""

from __future__ import annotations

from reslab.cli.options import add_inference_options


def add_arguments(parser) -> None:
    add_inference_options(parser, "source", "model", "classes")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files, any size or mode")
    add_inference_options(parser, "top_k", "device", "backend", "precision", "calibration", "calibration_images", "tta")
    parser.add_argument("--json", action="store_true", help="print a JSON list")


def run(args) -> int:
    import json

    from reslab.inference.predictor import Predictor

    predictor = Predictor(args.source, device=args.device, backend=args.backend, precision=args.precision,
                          top_k=args.top_k, model=args.model, classes=args.classes, calibration=args.calibration,
                          calibration_images=args.calibration_images, tta=args.tta)
    results = predictor.predict(args.images)
    if args.json:
        print(json.dumps([{"image": str(path), "top": [{"class": c, "probability": p} for c, p in top]}
                          for path, top in zip(args.images, results)], indent=2))
        return 0
    for path, top in zip(args.images, results):
        print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
    return 0
