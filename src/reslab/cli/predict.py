"""`reslab predict RUN_OR_CKPT IMAGE...`: top-k class names with probabilities."""

from __future__ import annotations

from reslab.errors import ReslabError


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CKPT", help="a run directory (its best weights) or a weights file")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files, any size or mode")
    parser.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda ...")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.add_argument("--backend", default="auto", help="auto (fastest installed), torch, onnxruntime, openvino")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto (bf16 where native; default)")


def run(args) -> int:
    import json

    from reslab.infer import Predictor

    if args.top_k < 1:
        raise ReslabError(f"--top-k must be at least 1, got {args.top_k}")
    predictor = Predictor(args.source, device=args.device, backend=args.backend, precision=args.precision)
    results = predictor.predict(args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps([{"image": str(path), "top": [{"class": c, "probability": p} for c, p in top]}
                          for path, top in zip(args.images, results)], indent=2))
        return 0
    for path, top in zip(args.images, results):
        print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
    return 0
