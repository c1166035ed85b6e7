"""`reslab bench`: training or inference images/s, ms per batch and GFLOP/s; `--compare` against peers."""

from __future__ import annotations

import argparse
import json

from reslab.cli.options import add_inference_options

PEAK = "2048^3"  # reslab.bench.PEAK_SIZE, not imported here: the parser is built without torch


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="resnet20", help="a registered model (default resnet20)")
    parser.add_argument("--mode", default="train", choices=["train", "infer"], help="train (default) or infer")
    parser.add_argument("--batch-size", type=int, help="default 128 for train, 32 for infer")
    parser.add_argument("--image-size", type=int, help="default: the family's native input (32 CIFAR, 224 ImageNet)")
    add_inference_options(parser, "precision", "backend")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (torch backend)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="memory format (default: what is faster on this hardware)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (default 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the timed window (default 5)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    add_inference_options(parser, "device")
    parser.add_argument("--compare", action="store_true",
                        help="also run the peers on the same input and print ratios: the textbook fp32 NCHW eager "
                             "loop, every installed backend in fp32, bf16 where the CPU has it natively, int8 "
                             "(ONNX Runtime, OpenVINO) where it has int8 dot products, and OpenVINO's plain "
                             "compile of the unfolded network (openvino-plain)")
    parser.add_argument("--json", action="store_true", help="print JSON (a list with --compare)")


def run(args) -> int:
    from reslab.bench import BenchConfig, compare, run_bench

    config = BenchConfig(model=args.model, mode=args.mode, batch_size=args.batch_size, image_size=args.image_size,
                         precision=args.precision, backend=args.backend, compile=args.compile,
                         channels_last=args.channels_last, warmup=args.warmup, seconds=args.seconds,
                         threads=args.threads, device=args.device)
    if not args.compare:
        result = run_bench(config)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _table([result], f"{result['model']} {result['mode']}")
        return 0
    config.resolve()  # refuse bad options before the first peer runs
    results = compare(config, on_result=None if args.json else _progress)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _table(results, f"{results[0]['model']} {results[0]['mode']}, peers in one process")
    return 0


def _progress(result: dict) -> None:
    from reslab.cli.tables import console

    console(stderr=True).print(f"  {result['name']}: {result['images_per_second']:.1f} img/s", markup=False,
                               highlight=False)


def _table(results: list[dict], title: str) -> None:
    from reslab.cli.tables import console, table

    first = results[0]
    columns = ["path", "precision", "NHWC", "images/s", "ms/batch", "GFLOP/s", "of peak"]
    if "ratio" in first:
        columns.append("vs textbook")
    rows = []
    for r in results:
        layout = {True: "yes", False: "no"}.get(r.get("channels_last"), "-")
        peak = "-" if r.get("peak_fraction") is None else f"{r['peak_fraction']:.0%}"
        row = [r["name"], r.get("openvino_inference_precision", r["precision"]), layout,
               f"{r['images_per_second']:.1f}", f"{r['ms_per_batch']:.1f}", f"{r['gflops_per_second']:.1f}", peak]
        if "ratio" in r:
            row.append(f"{r['ratio']:.2f}x")
        rows.append(row)
    out = console()
    out.print(table(f"{title}: batch {first['batch_size']}, {first['image_size']}px, {first['threads']} threads",
                    [(col, "left" if col in ("path", "precision") else "right") for col in columns], rows))
    train = ", x3 for a training step" if first["mode"] == "train" else ""
    hardware = first["hardware"]
    peaks = {r.get("peak_precision"): r.get("peak_gflops_per_second") for r in results}
    peaks = ", ".join(f"{precision} {gflops:.0f}" for precision, gflops in peaks.items() if gflops)
    out.print(f"GFLOP/s from MACs: 2 per MAC forward{train} (int8: integer ops); peak: a {PEAK} matrix product "
                  f"at the row's precision on the same threads ({peaks} GFLOP/s); {hardware['cpu_capability']}, "
                  f"native bf16: {hardware['cpu_bf16_native']}, VNNI: {hardware.get('cpu_int8_vnni')}, "
                  f"flags: {' '.join(hardware.get('cpu_flags', []))}", markup=False, highlight=False)
