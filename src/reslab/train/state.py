"""The run directory: its files, its lock, and the resume state that lets a run continue exactly.

last.state.pt is one plain dict (tensors, numbers, lists; `torch.load(weights_only=True)` reads
it) and holds the model weights too, so a resume point is a single atomic file: a kill between
writing last.safetensors and last.state.pt can never pair weights of one step with an optimizer
of another. The run's progress (`Progress`, `EpochRow`) is kept there as plain numbers and lists.

One run at a time: rank 0 holds an flock on RUN_DIR/.lock from before it writes anything until
it ends, so a second training started with the same `--out` (or `--resume`) is refused instead
of mixing its files with the first one's. The kernel drops the lock when its process dies, so the
lock file of a killed run blocks nothing.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reslab.checkpoint import BEST, LAST
from reslab.errors import ReslabError
from reslab.io import atomic_path, write_text

CONFIG, METRICS, SUMMARY, STATE, CURVES = "config.json", "metrics.csv", "summary.json", "last.state.pt", "curves.png"
LOCK = ".lock"
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
# steps.csv: the training loss and accuracy within epochs, one row per window of about a tenth of an
# epoch (reslab.train.loop.POINTS_PER_EPOCH), at the optimizer step that ends it: the paper's Figure 6
# draws training error against iterations, and a short schedule of long epochs has few epoch rows.
STEPS, STEP_COLUMNS = "steps.csv", ("step", "epoch", "train_loss", "train_acc")
# Appended to metrics.csv by a run with --ema: the averaged weights' validation loss and accuracy.
EMA_COLUMNS = ("ema_val_loss", "ema_val_acc")
STATE_FORMAT = "reslab-train-state"
STATE_VERSION = 1
# Files that hold trained epochs or steps: a folder with any of them is a run to resume, not to reuse.
TRAINED = (STATE, METRICS, LAST, BEST)
# reslab.io.atomic_path's temporary files (mkstemp: ".<name>." + 8 random characters + ".tmp"),
# left behind only by a process killed in the middle of a write.
_PARTIAL_WRITE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@dataclass
class EpochRow:
    """One line of metrics.csv (METRIC_COLUMNS, then EMA_COLUMNS in a run with --ema)."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    seconds: float
    ema_val_loss: float | None = None
    ema_val_acc: float | None = None

    def values(self) -> list:
        return [getattr(self, name) for name in METRIC_COLUMNS + EMA_COLUMNS]


@dataclass
class PartialEpoch:
    """An interrupted epoch's sums over all ranks, and its seconds so far (a list in the state file)."""

    loss: float = 0.0  # sum of the examples' losses
    correct: float = 0.0
    count: float = 0.0
    seconds: float = 0.0


@dataclass
class Progress:
    """Where a run stands, saved with every checkpoint; a resumed run goes on from it."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # steps of the current epoch already trained (a resume skips them)
    global_step: int = 0  # optimizer steps of the whole run: the lr schedule's clock
    partial: PartialEpoch = field(default_factory=PartialEpoch)
    rows: list[EpochRow] = field(default_factory=list)
    best_val_acc: float | None = None
    best_epoch: int | None = None
    best_weights: str | None = None  # "model", or "ema" when the averaged weights were the better
    # The best weights' validation balanced accuracy and macro F1 (summary.json); with
    # --class-weights/--sampler balanced the best weights are the best balanced accuracy's.
    best_balanced_accuracy: float | None = None
    best_macro_f1: float | None = None
    bad_epochs: int = 0  # epochs since the best validation accuracy (early stopping's count)
    train_seconds: float = 0.0
    train_images: float = 0.0
    stopped: str = "running"  # running, interrupted, early_stop or completed
    # steps.csv's rows: [step, epoch (fractional), training loss, training accuracy] over each window
    # of steps (this rank's batches; a resumed window starts at the resume).
    points: list[list[float]] = field(default_factory=list)

    def to_state(self) -> dict:
        return {**dataclasses.asdict(self), "partial": list(dataclasses.astuple(self.partial)),
                "rows": [row.values() for row in self.rows]}

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in state.items() if k in names}
        values["rows"] = [EpochRow(*row) for row in values.get("rows", [])]
        values["partial"] = PartialEpoch(*values.get("partial", ()))
        return cls(**values)


def safe_name(data: str) -> str:
    """A filesystem-safe short name of a data spec: "digits", or a folder's last component."""
    name = Path(str(data).rstrip("/\\")).name or "data"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "data"


def new_run_dir(out: str | None, model: str, data: str) -> Path:
    """`out`, or runs/<model>-<data>-<time>/ (a name not taken yet)."""
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
    return path


def trained_files(run_dir: Path) -> list[str]:
    return [name for name in TRAINED if (run_dir / name).exists()]


class RunLock:
    """The run directory, created if need be and locked (flock on RUN_DIR/.lock) until `release()`.

    Releasing removes the lock file, and the folders this lock created if nothing else was
    written in them (a refused run leaves no empty run directory behind).
    """

    def __init__(self, run_dir: Path, flag: str):
        self.run_dir, self.flag = run_dir, flag
        self.created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.fd = self._lock(run_dir / LOCK)
        except OSError as err:
            refusal = unwritable(flag, run_dir, err)  # before the folders it names are removed
            self._remove_created()
            raise refusal from None

    def _lock(self, path: Path) -> int:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ReslabError(f"{self.flag} {self.run_dir} is in use by another training (process {holder}); "
                                  "wait for it to end, or choose another folder") from None
            # A releasing run removes the file after we opened it: lock the file now at that path.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    os.ftruncate(fd, 0)
                    os.write(fd, str(os.getpid()).encode())
                    return fd
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        (self.run_dir / LOCK).unlink(missing_ok=True)  # while still locked: nobody holds a removed file
        os.close(self.fd)
        self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self.created:  # deepest first; rmdir leaves any folder that holds something
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def unwritable(flag: str, path: Path, err: OSError) -> ReslabError:
    """An OSError met creating or writing the run directory, as one line naming the folder at fault:
    the nearest existing folder above what could not be made or written."""
    failed = Path(err.filename) if err.filename else path / LOCK
    existing = next((p for p in failed.parents if p.exists()), path)
    if not existing.is_dir():
        where = f"{existing} is a file, not a folder"
    else:
        where = f"cannot write in {existing} ({err.strerror or type(err).__name__})"
    advice = "choose a folder you can write" if flag == "--out" else "copy the run to a folder you can write"
    return ReslabError(f"{flag} {path}: {where}; {advice}")


def claim_run_dir(out: str | None, model: str, data: str) -> tuple[Path, RunLock]:
    """A run directory for a new run, locked: `out` (or a new name); refused when it holds a run's
    trained epochs. One that holds only a config.json (a run killed before its first checkpoint)
    is taken over: no trained step is lost."""
    path = new_run_dir(out, model, data)
    lock = RunLock(path, "--out")
    found = trained_files(path)
    if found:
        lock.release()
        raise ReslabError(f"--out {path} already holds a run ({', '.join(found)}); continue it with "
                          f"--resume {path} or choose another --out")
    remove_partial_writes(path)
    return path, lock


def remove_partial_writes(run_dir: Path) -> list[str]:
    """Delete the temporary files of writes interrupted by a kill (see _PARTIAL_WRITE); only under
    the run's lock, when no other process can be writing them."""
    removed = [p.name for p in run_dir.iterdir() if p.is_file() and _PARTIAL_WRITE.fullmatch(p.name)]
    for name in removed:
        (run_dir / name).unlink(missing_ok=True)
    return removed


def read_config(run_dir: Path) -> dict:
    """The saved TrainConfig fields of a run directory, for --resume."""
    if not run_dir.is_dir():
        raise ReslabError(f"--resume {run_dir}: no such run directory; give a folder made by `reslab train`")
    if not (run_dir / CONFIG).is_file():
        found = trained_files(run_dir)
        held = f"; it holds {', '.join(found)}" if found else ""
        raise ReslabError(f"--resume {run_dir}: holds no run (no {CONFIG}{held}); give a folder made by "
                          "`reslab train`")
    try:
        return json.loads((run_dir / CONFIG).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ReslabError(f"--resume {run_dir}: {CONFIG} is damaged; the run cannot be resumed") from None


def load_state(run_dir: str | Path) -> dict | None:
    """The resume state of a run directory; None for a run killed before its first checkpoint."""
    run_dir = Path(run_dir)
    path = run_dir / STATE
    if not path.is_file():
        if (run_dir / METRICS).exists():  # epochs were recorded, but what they reached is gone
            raise ReslabError(f"--resume {run_dir}: holds {METRICS} but no {STATE}; its epochs cannot be "
                              "continued, start a new run with another --out")
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: say which, never a traceback
        raise ReslabError(f"--resume {run_dir}: {STATE} is unreadable ({type(err).__name__}); the run cannot "
                          "be resumed, start a new one") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ReslabError(f"--resume {run_dir}: {STATE} is not a reslab training state; start a new run")
    return state


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


def write_metrics(path: Path, rows: list[EpochRow]) -> None:
    """The whole metrics.csv, rewritten atomically (a resumed run's rows come from its state)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = METRIC_COLUMNS + (EMA_COLUMNS if any(row.ema_val_acc is not None for row in rows) else ())
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
                         for v in row.values()[:len(columns)]])
    write_text(path, buf.getvalue())


def write_steps(path: Path, points: list[list[float]]) -> None:
    """The whole steps.csv (Progress.points), rewritten atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(STEP_COLUMNS)
    writer.writerows([int(step), f"{epoch:.4g}", f"{loss:.6g}", f"{acc:.6g}"] for step, epoch, loss, acc in points)
    write_text(path, buf.getvalue())


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]
