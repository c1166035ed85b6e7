"""reslab's inference paths against a plain OpenVINO compile of the same network (issue 20).

    flock /tmp/reslab-cpu.lock .venv/bin/python benchmarks/bench_openvino.py --model resnet50 \
        --out benchmarks/results-openvino.json

At each batch size every row is built once, warmed up, then timed in alternating rounds (one call of
each row per round, more calls per round at batch 1), all in this process on the same input, so that
load drifting on a shared machine falls on every row alike. A row's figure is its median call.

Rows: reslab `--backend auto --precision auto` (the question), reslab's OpenVINO runner as it is
(`openvino_settings` by batch size) and as it was before issue 20 (the LATENCY hint at every batch
size, one request: `OpenVinoRunner(hint="LATENCY")`), OpenVINO's plain compile
(reslab.bench.plain_openvino_step), the same plain compile called the way its own one-liner reads,
`compiled(x)` on one request (batch > 1 only), and reslab's ONNX Runtime and torch paths; all at
the precision `auto` resolves to here (ONNX Runtime: fp32, it has no bf16 CPU kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from reslab.bench import BenchConfig, _meta, _model, infer_step, peak_gflops
from reslab.hardware import describe
from reslab.inference import OpenVinoRunner, cached_export, installed_backends


def rows(model_name: str, batch_size: int, threads: int) -> dict[str, BenchConfig]:
    """The resolved configurations to time, by row name; `auto` is named by what it resolves to."""
    base = BenchConfig(model=model_name, mode="infer", batch_size=batch_size, threads=threads)
    auto = base.resolve()
    precision = auto.precision
    configs = {f"reslab auto (= {auto.backend} {precision})": auto}
    for backend in ("openvino", "onnxruntime", "torch"):
        if backend not in installed_backends():
            continue
        row_precision = "fp32" if backend == "onnxruntime" else precision
        cfg = dataclasses.replace(base, backend=backend, precision=row_precision).resolve()
        if cfg != auto:
            configs[f"reslab {backend} {row_precision}"] = cfg
    if "openvino" in installed_backends():
        configs[f"openvino-plain {precision}"] = dataclasses.replace(base, precision=precision,
                                                                     plain_openvino=True).resolve()
    return configs


def steps(model_name: str, batch_size: int, threads: int) -> dict[str, tuple]:
    """Row name -> (the call to time, what it ran with)."""
    torch.set_num_threads(threads)
    out = {}
    for name, cfg in rows(model_name, batch_size, threads).items():
        model = _model(cfg)
        x = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
        out[name] = infer_step(cfg, model, x)
        if cfg.backend == "openvino" and not cfg.plain_openvino:
            before = OpenVinoRunner(cached_export(model, _meta(cfg), "openvino"), precision=cfg.precision,
                                    threads=threads, hint="LATENCY")
            out[f"reslab openvino {cfg.precision}, before (LATENCY, one request)"] = (lambda r=before, x=x: r(x), {})
        if cfg.plain_openvino and batch_size > 1:
            import openvino as ov

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = ov.convert_model(model.eval(), example_input=x[:1])
            compiled = ov.Core().compile_model(converted, "CPU", {
                "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": "bf16" if cfg.precision == "bf16" else "f32"})
            array = x.numpy()
            out[f"openvino-plain {cfg.precision}, one compiled(x) call"] = (lambda c=compiled, a=array: c(a)[0], {})
    return out


def measure(model_name: str, batch_size: int, threads: int, rounds: int, warmup: int) -> list[dict]:
    built = steps(model_name, batch_size, threads)
    calls = 1 if batch_size > 1 else 10
    for step, _ in built.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(rounds):
        for name, (step, _) in built.items():
            for _ in range(calls):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    results = []
    for name, (_, settings) in built.items():
        median = statistics.median(times[name])
        results.append({"row": name, "batch_size": batch_size, "ms_median": 1000 * median,
                        "images_per_second": batch_size / median, "ms_min": 1000 * min(times[name]),
                        "calls": len(times[name]), "times": times[name],
                        **{k: v for k, v in settings.items() if k.startswith("openvino")}})
        print(f"  batch {batch_size:3d}  {name:58s} {1000 * median:9.1f} ms  {batch_size / median:7.1f} img/s",
              file=sys.stderr, flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    hardware = describe()
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "hardware": hardware, "load_average_start": os.getloadavg()[0], "threads": args.threads,
              "peak_gflops": {}, "rows": []}
    precisions = ["fp32"] + (["bf16"] if hardware["cpu_bf16_native"] else [])
    for precision in precisions:
        record["peak_gflops"][precision] = peak_gflops(precision, args.threads)
    for batch_size in args.batch_sizes:
        record["rows"] += measure(args.model, batch_size, args.threads, args.rounds, args.warmup)
    for precision in precisions:  # the best of a measurement before and after the rows
        record["peak_gflops"][precision] = peak_gflops(precision, args.threads)
    record["load_average_end"] = os.getloadavg()[0]
    # median call, and in brackets the best: on a shared machine a burst of another job slows some calls
    print("| row | " + " | ".join(f"batch {b} {'ms' if b == 1 else 'img/s'}" for b in args.batch_sizes) + " |")
    names = list(dict.fromkeys(r["row"] for r in record["rows"]))
    for name in names:
        cells = []
        for b in args.batch_sizes:
            found = [r for r in record["rows"] if r["row"] == name and r["batch_size"] == b]
            if found:
                row = found[0]
                cells.append(f"{row['ms_median']:.1f} ({row['ms_min']:.1f})" if b == 1 else
                             f"{row['images_per_second']:.1f} ({b * 1000 / row['ms_min']:.1f})")
            else:
                cells.append("-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"peaks (GFLOP/s, 2048^3 matmul, {args.threads} threads): {record['peak_gflops']}; "
          f"load {record['load_average_start']:.1f} -> {record['load_average_end']:.1f}")
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
