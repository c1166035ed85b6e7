"""`reslab export RUN_OR_CKPT --format onnx|openvino`: the BN-folded graph, checked against PyTorch."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CKPT", help="a run directory (its best weights) or a weights file")
    parser.add_argument("--format", required=True, choices=["onnx", "openvino"], help="onnx or openvino")
    parser.add_argument("--out", help="output file (default: beside the weights, .onnx or .xml + .bin)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")


def run(args) -> int:
    from reslab.inference.export import TOLERANCE, export

    result = export(args.source, args.format, args.out, opset=args.opset)
    print(f"wrote {result.path} ({result.format}, dynamic batch, BatchNorm folded)")
    if result.max_abs_diff is None:
        print("not checked: install onnxruntime or openvino to compare with PyTorch")
    else:
        print(f"max abs difference against PyTorch ({result.checked_with}, fp32): {result.max_abs_diff:.3g} "
              f"(tolerance {TOLERANCE:g})")
    return 0
