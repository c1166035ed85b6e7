"""The run directory: its files, and the resume state that lets an interrupted run continue exactly.

last.state.pt is one plain dict (tensors, numbers, lists; `torch.load(weights_only=True)` reads
it) and holds the model weights too, so a resume point is a single atomic file: a kill between
writing last.safetensors and last.state.pt can never pair weights of one step with an optimizer
of another.
"""

from __future__ import annotations

import csv
import io
import re
import time
from pathlib import Path

import torch

from reslab.errors import ReslabError
from reslab.io import atomic_path, write_text

CONFIG, METRICS, SUMMARY, STATE, CURVES = "config.json", "metrics.csv", "summary.json", "last.state.pt", "curves.png"
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
STATE_FORMAT = "reslab-train-state"
STATE_VERSION = 1


def safe_name(data: str) -> str:
    """A filesystem-safe short name of a data spec: "digits", or a folder's last component."""
    name = Path(str(data).rstrip("/\\")).name or "data"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "data"


def new_run_dir(out: str | None, model: str, data: str) -> Path:
    """`out`, or runs/<model>-<data>-<time>/; refuses a folder that already holds a run."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{model}-{safe_name(data)}-{stamp}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path("runs") / f"{model}-{safe_name(data)}-{stamp}-{suffix}"
        return path
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ReslabError(f"--out {out} is a file; give a folder for the run")
    if path.is_dir() and any((path / name).exists() for name in (CONFIG, STATE, METRICS)):
        raise ReslabError(f"--out {out} already holds a run; continue it with --resume {out} or choose another --out")
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, tmp)


def load_state(run_dir: str | Path) -> dict:
    """The resume state of a run directory; a folder without one is refused naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReslabError(f"--resume {run_dir}: no such run directory; give a folder made by `reslab train`")
    path = run_dir / STATE
    if not (run_dir / CONFIG).is_file() or not path.is_file():
        raise ReslabError(f"--resume {run_dir}: holds no run (no {CONFIG} and {STATE}); give a folder made by "
                          "`reslab train`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: say which, never a traceback
        raise ReslabError(f"--resume {run_dir}: {STATE} is unreadable ({type(err).__name__}); the run cannot "
                          "be resumed, start a new one") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ReslabError(f"--resume {run_dir}: {STATE} is not a reslab training state; start a new run")
    return state


def write_metrics(path: Path, rows: list[list]) -> None:
    """The whole metrics.csv, rewritten atomically (a resumed run's rows come from its state)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    write_text(path, buf.getvalue())


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]
