"""The files a training run keeps up to date: config.json, the checkpoint, metrics, summary, curves.

Written by rank 0 after every epoch (reslab.train.loop) and, into a scratch folder, by the budget's
measurement (reslab.train.budget), which times exactly this writing.
"""

from __future__ import annotations

import json
from pathlib import Path

from reslab.checkpoint import LAST, save_weights
from reslab.data import balance
from reslab.io import write_json
from reslab.train import state as run_files
from reslab.train.run import Run


def write_config(run: Run) -> None:
    """config.json: the resolved config (its epochs fixed), what the data and machine were, and for a
    --budget run how the epochs were chosen."""
    if run.ctx.is_main:
        budget = {"budget": run.budget} if run.budget is not None else {}
        write_json(run.dir / run_files.CONFIG, {"config": run.cfg.to_dict(), **run.record, **budget})


def saved_record(run_dir: Path) -> dict:
    """A run's whole config.json ({} when unreadable: read_config has vouched for it already)."""
    try:
        record = json.loads((run_dir / run_files.CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}



def checkpoint(run: Run) -> None:
    p = run.progress
    save_weights(run.dir / LAST, run.model, run.meta(p.epoch, p.rows[-1].val_acc if p.rows else None))
    ema = {"ema": run.ema.model.state_dict()} if run.ema is not None else {}
    run_files.save_state(run.dir / run_files.STATE, {**p.to_state(), "model": run.model.state_dict(),
                                                     "optimizer": run.optimizer.state_dict(),
                                                     "rng": run_files.rng_state(), **ema})


def summary(run: Run, test: dict[str, float] | None = None) -> dict:
    p, cfg = run.progress, run.cfg
    last = p.rows[-1] if p.rows else None
    return {
        "model": cfg.model, "data": cfg.data, "epochs": len(p.rows), "planned_epochs": cfg.epochs,
        "best_val_acc": p.best_val_acc, "best_epoch": p.best_epoch, "best_weights": p.best_weights,
        # The best weights' validation scores; "best_by": what chose them (reslab.data.balance).
        "balanced_accuracy": p.best_balanced_accuracy, "macro_f1": p.best_macro_f1,
        "best_by": "val_acc" if balance.selection_metric(cfg) == "acc" else "balanced_accuracy",
        "final_val_acc": last.val_acc if last else None, "final_train_acc": last.train_acc if last else None,
        "test_acc": test["acc"] if test else None, "test_loss": test["loss"] if test else None,
        "train_seconds": round(p.train_seconds, 3),
        "images_per_second": round(p.train_images / p.train_seconds, 1) if p.train_seconds else None,
        "precision": run.precision, "channels_last": run.channels_last, "device": str(run.device),
        "trainable_params": sum(q.numel() for q in run.model.parameters() if q.requires_grad),
        "frozen_params": sum(q.numel() for q in run.model.parameters() if not q.requires_grad),
        "stopped": p.stopped, "interrupted": p.stopped == "interrupted", "run_dir": str(run.dir),
        **({"budget": dict(run.budget)} if run.budget is not None else {}),
    }


def write_summary(run: Run, result: dict) -> None:
    write_json(run.dir / run_files.SUMMARY, result)


def write_records(run: Run, curves: bool = True) -> None:
    run_files.write_metrics(run.dir / run_files.METRICS, run.progress.rows)
    run_files.write_steps(run.dir / run_files.STEPS, run.progress.points)
    write_summary(run, summary(run))
    if curves:
        draw_curves(run)


def draw_curves(run: Run) -> None:
    """curves.png from the metrics rows (the caller notes when: reslab.train.loop.Run.curves_drawn)."""
    from reslab import plots

    plots.curves(run.dir / run_files.CURVES, [row.values() for row in run.progress.rows])
