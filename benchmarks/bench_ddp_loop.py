"""Two-process training, run again and again: does any run abort (issue 20)?

    flock /tmp/reslab-cpu.lock .venv/bin/python benchmarks/bench_ddp_loop.py --n 30 --json ddp-loop.json

Runs `torchrun --nproc_per_node 2 -m reslab train ARGS` N times, then `reslab train --nproc 2 ARGS`
N times (ARGS: --data digits --model resnet20 --epochs 2 by default), each in a fresh folder, one
at a time. A run fails when it exits non-zero, when its output mentions a signal ("SIGABRT",
"Signal") or when it does not print its end line exactly once (rank 0 alone prints it). Prints
and writes a JSON summary: the commands, counts, failures with their output's tail, seconds per
run, and the machine (CPU flags, the measured 2048^3 matrix-product peak). Figures in
benchmarks/RESULTS.md, "DDP teardown (issue 20)".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

END_LINE = re.compile(r"(?m)^\S+ on \S+: \d+ epochs in ")  # cli/train.py's end line
SIGNAL = re.compile(r"SIGABRT|Signal \d+|signal \d+|terminate called|core dumped")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(kind: str, train_args: list[str]) -> list[str]:
    if kind == "torchrun":
        # The user's command; a free --master_port only so that a test of someone else's on the
        # default port 29500 cannot make a run fail for a reason of its own.
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "reslab", "train", *train_args]
    return [sys.executable, "-m", "reslab", "train", "--nproc", "2", *train_args]


def one_run(kind: str, train_args: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="reslab-ddp-loop-") as work:
        cmd = commands(kind, [*train_args, "--out", "R"])
        if kind == "torchrun":
            cmd[cmd.index("--nproc_per_node"):cmd.index("--nproc_per_node")] = ["--log-dir", str(Path(work) / "logs")]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout)
            rc, out = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            rc, out = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
        seconds = time.perf_counter() - start
    ends = len(END_LINE.findall(out))
    reasons = ([f"exit code {rc}"] if rc != 0 else []) + (
        [f"signal in output: {SIGNAL.search(out).group(0)!r}"] if SIGNAL.search(out) else []) + (
        [f"{ends} end lines"] if ends != 1 else [])
    return {"kind": kind, "rc": rc, "seconds": round(seconds, 2), "end_lines": ends, "failed": bool(reasons),
            "reasons": reasons, "tail": out[-3000:] if reasons else ""}


def machine() -> dict:
    from reslab.bench import peak_gflops
    from reslab.hardware import cpu_flags, describe

    threads = torch.get_num_threads()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {**describe(), "flags": sorted(f for f in cpu_flags() if f in wanted), "cpu_count": os.cpu_count(),
            "peak_gflops": {p: round(peak_gflops(p, threads) or 0.0, 1) for p in ("bf16", "fp32")},
            "peak_threads": threads, "load_before": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="runs of each kind (default 30)")
    parser.add_argument("--kinds", nargs="+", choices=("torchrun", "nproc"), default=["torchrun", "nproc"])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()
    train_args = ["--data", args.data, "--model", args.model, "--epochs", str(args.epochs)]
    summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "commands": {k: " ".join(commands(k, [*train_args, "--out", "R"])[1:]) for k in args.kinds},
               "n": args.n, "kinds": {}}
    for kind in args.kinds:
        runs = []
        for i in range(args.n):
            runs.append(one_run(kind, train_args, args.timeout))
            r = runs[-1]
            print(f"{kind} {i + 1}/{args.n}: rc {r['rc']} {r['seconds']:.1f}s"
                  f"{' FAILED: ' + '; '.join(r['reasons']) if r['failed'] else ''}", file=sys.stderr, flush=True)
            if r["failed"]:
                print(r["tail"], file=sys.stderr, flush=True)
        seconds = [r["seconds"] for r in runs]
        summary["kinds"][kind] = {
            "runs": len(runs), "failures": sum(r["failed"] for r in runs),
            "seconds_mean": round(statistics.mean(seconds), 2), "seconds_median": round(statistics.median(seconds), 2),
            "seconds_max": max(seconds), "failed_runs": [dict(r, run=i + 1) for i, r in enumerate(runs) if r["failed"]],
        }
    summary["load_after"] = os.getloadavg()
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
