"""Does a `--budget` run end between 90 % and 100 % of its budget (issue 21, item 4)?

    flock /tmp/reslab-cpu.lock .venv/bin/python benchmarks/bench_budget.py --data cats-vs-dogs-2000 \
        --budget 15m --seeds 0 1 --json budget-cats.json

Runs `reslab train --data DATA --val-split 0.1 --budget B --seed S [EXTRA...]` once per seed, one
at a time, each in a fresh folder, and times the whole command from outside (process start to
exit: what a user's stopwatch sees, imports and loading included). Prints and writes one JSON
record per run: the wall seconds and their share of the budget, the trainer's own `used_seconds`,
the epochs the measurement planned and the epochs run, every re-plan, the best validation
accuracy, and the machine (CPU flags, the measured 2048^3 matrix-product peak, the load before).
Figures in benchmarks/RESULTS.md, "A budget that is a budget (issue 21)".
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_ddp_loop import machine
from reslab.train.config import parse_duration


def run_once(data: str, budget: str, seed: int, extra: list[str], folder: Path) -> dict:
    command = [str(Path(sys.executable).with_name("reslab")), "train", "--data", data, "--val-split", "0.1",
               "--budget", budget, "--seed", str(seed), "--out", str(folder), *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((folder / "summary.json").read_text())
    plan = summary["budget"]
    seconds = parse_duration(budget)
    return {"command": " ".join(command[1:]), "seed": seed, "wall_seconds": round(wall, 1),
            "wall_share": round(wall / seconds, 3), "used_seconds": plan["used_seconds"],
            "used_share": round(plan["used_seconds"] / seconds, 3), "measured_epochs": plan.get("measured_epochs"),
            "epochs": summary["epochs"], "replans": plan.get("replans", []), "epoch_seconds_measured":
            plan["epoch_seconds"], "setup_seconds": plan["setup_seconds"], "best_val_acc": summary["best_val_acc"],
            "best_epoch": summary["best_epoch"], "tta": summary.get("tta"), "model": summary["model"],
            "end_lines": done.stdout.strip().splitlines()[-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--budget", default="15m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", default=None, help="also write the records here")
    parser.add_argument("--keep", default=None, help="copy each run folder here (KEEP/seed<S>)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `reslab train` options")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    records = []
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for seed in args.seeds:
        host = machine()
        folder = Path(tempfile.mkdtemp(prefix="bench-budget-"))
        try:
            record = {"date": stamp, "machine": host, **run_once(args.data, args.budget, seed, extra, folder / "run")}
            if args.keep:
                shutil.copytree(folder / "run", Path(args.keep) / f"seed{seed}", dirs_exist_ok=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "machine"}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
