"""`reslab evaluate RUN_OR_CKPT`: top-1/top-5, per-class precision/recall/F1, confusion.png, samples.png,
top_losses.png."""

from __future__ import annotations

from reslab.cli.options import add_inference_options
from reslab.cli.tables import console, table


def add_arguments(parser) -> None:
    add_inference_options(parser, "source", "model", "classes")
    parser.add_argument("--data", help="data to evaluate on (default: the checkpoint's training data)")
    parser.add_argument("--split", help="test or val (default: test where there is one)")
    parser.add_argument("--out", help="folder for eval.json and the figures (default RUN/eval-<data>/)")
    parser.add_argument("--data-dir", help="cache folder for downloads and decoded folders")
    add_inference_options(parser, "device", "backend", "precision", "calibration", "calibration_images", "tta")
    parser.add_argument("--top-losses", type=int, metavar="N",
                        help="images in top_losses.png, those with the highest loss -log p(true), with their "
                             "files (default 16 for image folders; 0: none; digits and CIFAR: none unless asked, "
                             "shown by index)")
    parser.add_argument("--json", action="store_true", help="print eval.json instead of a table")


def run(args) -> int:
    import json

    from reslab.evaluate import evaluate

    result = evaluate(args.source, data=args.data, split=args.split, out=args.out, device=args.device,
                      data_dir=args.data_dir, backend=args.backend, precision=args.precision, model=args.model,
                      classes=args.classes, calibration=args.calibration,
                      calibration_images=args.calibration_images, tta=args.tta, top_losses=args.top_losses)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=2))
        return 0
    columns = [("class", "left"), ("precision", "right"), ("recall", "right"), ("f1", "right"), ("support", "right")]
    rows = [*result["per_class"].items(), *((f"{kind} avg", m) for kind, m in result["average"].items())]
    cells = [[name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"])]
             for name, m in rows]
    out = console()
    if result.get("tta_note"):
        out.print(result["tta_note"], markup=False, highlight=False)
    out.print(table(f"{result['model']} on {result['data']} ({result['split']}, {result['n']} images)", columns, cells))
    out.print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  balanced accuracy "
              f"{result['balanced_accuracy']:.4f}  macro F1 {result['macro_f1']:.4f}  -> {result['out']}",
              markup=False, highlight=False)
    if result["top_losses"]:
        out.print(f"top losses: {len(result['top_losses'])} images in top_losses.png; {len(result['misclassified'])} "
                  "mistakes by file in eval.json (misclassified)", markup=False, highlight=False)
    return 0
