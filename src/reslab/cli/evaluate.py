"""`reslab evaluate RUN_OR_CKPT`: top-1/top-5, per-class precision/recall, confusion.png, samples.png."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from reslab.cli.options import add_inference_options


def add_arguments(parser) -> None:
    add_inference_options(parser, "source", "model", "classes")
    parser.add_argument("--data", help="data to evaluate on (default: the checkpoint's training data)")
    parser.add_argument("--split", help="test or val (default: test where there is one)")
    parser.add_argument("--out", help="folder for eval.json and the figures (default RUN/eval-<data>/)")
    parser.add_argument("--data-dir", help="cache folder for downloads and decoded folders")
    add_inference_options(parser, "device", "backend", "precision", "calibration", "calibration_images", "tta")
    parser.add_argument("--json", action="store_true", help="print eval.json instead of a table")


def run(args) -> int:
    import json

    from reslab.evaluate import evaluate

    result = evaluate(args.source, data=args.data, split=args.split, out=args.out, device=args.device,
                      data_dir=args.data_dir, backend=args.backend, precision=args.precision, model=args.model,
                      classes=args.classes, calibration=args.calibration,
                      calibration_images=args.calibration_images, tta=args.tta)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=2))
        return 0
    table = Table(title=f"{result['model']} on {result['data']} ({result['split']}, {result['n']} images)")
    for col in ("class", "precision", "recall", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, m in result["per_class"].items():
        table.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", str(m["support"]))
    console = Console()
    if result.get("tta_note"):
        console.print(result["tta_note"], highlight=False)
    console.print(table)
    console.print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  -> {result['out']}", highlight=False)
    return 0
