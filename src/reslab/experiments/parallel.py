"""An experiment's nets trained side by side (`--jobs N`): N worker processes, each training one
net at a time on its share of the CPU threads.

Why: the paper's CIFAR nets are too small to keep two CPU threads busy. ResNet-20 at batch 128 in
fp32 on a 2-core AVX2 EPYC took 0.37-0.41 s a step on 2 threads and 0.63 s on 1 thread with a
second run beside it (0.32 s a step of the pair), and Table 6's full schedule ran 116 s an epoch a
net with two seeds side by side against 140 s one at a time (benchmarks/RESULTS.md).

Each worker trains exactly what the experiment would train in turn (`train_one`: a net begun is
continued, a finished one read back), quietly; the parent prints each epoch a net logs (from its
metrics.csv) and hands the nets back in the experiment's order. Ctrl-C in the parent, a stop hook
or a net that fails reaches every worker through one shared event: each running net checkpoints
at its next step, no further net begins, and the experiment ends with the usual --resume message.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# How often (seconds) the parent looks for finished nets and new epochs.
POLL_SECONDS = 1.0
# A worker that exited without a word is given this long for its last message to arrive.
LAST_WORD_SECONDS = 5.0


def worker_threads(jobs: int) -> int:
    """Each worker's share of this process's CPU threads (at least one)."""
    import torch

    return max(1, torch.get_num_threads() // jobs)


def train_side_by_side(configs: dict, train_one: Callable, progress: Callable[[int, int, str], None] | None, *,
                       resume: str | None, stop: Callable[[str, int, int], bool] | None, jobs: int,
                       quiet: bool) -> Iterator[tuple[str, object, dict]]:
    """(name, config, the trainer's summary) for each net of `configs`, in their order, trained by
    up to `jobs` worker processes at once with `train_one(config, resume, stop hook)`
    (reslab.experiments.common's). It and `stop` travel to the workers, so both must be
    module-level functions. The caller ends the experiment at a net that stopped early (closing this
    generator stops the others, each with a checkpoint)."""
    from reslab.errors import ReslabError
    from reslab.train.bar import sigint_flag

    spawn = multiprocessing.get_context("spawn")  # no fork of a process that holds OpenMP threads
    halt, results = spawn.Event(), spawn.Queue()
    order = list(configs)
    running, finished, failures = {}, {}, []
    logged = {}  # per running net (unless quiet): its epochs printed, or logged before it began here
    began = handed = 0  # the nets begun, and handed back, so far (both in order)
    threads = worker_threads(min(jobs, len(order)))  # 2 nets on 16 threads with --jobs 4: 8 threads each
    with sigint_flag() as interrupted:
        try:
            while running or (began < len(order) and not halt.is_set()):
                if interrupted.is_set():
                    halt.set()
                while began < len(order) and len(running) < jobs and not halt.is_set():
                    name = order[began]
                    if progress is not None:
                        progress(began, len(order), name)
                    began += 1
                    worker = spawn.Process(target=_work, args=(name, configs[name], train_one, resume, stop, halt,
                                                               threads, results), name=f"reslab-{name}")
                    worker.start()
                    running[name] = [worker, None]  # the process, and when it was first seen exited
                    if not quiet:
                        logged[name] = len(_logged_epochs(configs[name]))  # a resumed net's earlier epochs: not again
                        if logged[name]:
                            print(f"{name}: continues after epoch {logged[name]} of {configs[name].epochs}",
                                  flush=True)
                for name, outcome in _messages(results, running):
                    running.pop(name)[0].join()
                    if outcome[0] == "error":
                        failures.append(f"{name}: {outcome[1]}")
                    else:
                        finished[name] = outcome[1]
                    if outcome[0] == "error" or outcome[1].get("interrupted"):
                        halt.set()  # as in turn: the experiment stops at a net that did not finish
                _print_epochs(configs, logged)
                for name in [name for name in logged if name not in running]:
                    del logged[name]  # ended: its last epochs are printed
                # Each net as soon as those before it are in (the experiment writes its summary after
                # each); one that stopped early ends the experiment, and the `finally` below stops the rest.
                while handed < len(order) and order[handed] in finished:
                    handed += 1
                    yield order[handed - 1], configs[order[handed - 1]], finished[order[handed - 1]]
        finally:
            halt.set()
            for worker, _ in running.values():
                while worker.is_alive():  # read what it sends, so that it can exit (a full pipe would hold it)
                    try:
                        results.get(timeout=POLL_SECONDS)
                    except queue.Empty:
                        pass
                worker.join()
    if failures:
        raise ReslabError("; ".join(failures))
    if handed < len(order):  # stopped (Ctrl-C) before a net began
        raise ReslabError(f"stopped before {order[handed]} began; continue the experiment with --resume "
                          f"{Path(configs[order[handed]].out).parent}")


def _messages(results, running: dict) -> list[tuple[str, tuple]]:
    """The outcomes workers sent within POLL_SECONDS; a worker that exited without one is a failure."""
    out = []
    try:
        out.append(results.get(timeout=POLL_SECONDS))
        while True:
            out.append(results.get_nowait())
    except queue.Empty:
        pass
    told = {name for name, _ in out}
    now = time.monotonic()
    for name, entry in running.items():
        worker, seen_exited = entry
        if name in told or worker.exitcode is None:
            continue
        if seen_exited is None:
            entry[1] = now
        elif now - seen_exited > LAST_WORD_SECONDS:
            out.append((name, ("error", f"its process ended with exit code {worker.exitcode}")))
    return out


def _print_epochs(configs: dict, logged: dict) -> None:
    """One line for each epoch a net of `logged` logged since the last look (its metrics.csv)."""
    for name in logged:
        cfg = configs[name]
        rows = _logged_epochs(cfg)
        for row in rows[logged[name]:]:
            val = "" if row["val_acc"] is None else f"  val acc {row['val_acc']:.4f}"
            print(f"{name}: epoch {int(row['epoch'])}/{cfg.epochs}  train loss {row['train_loss']:.4f}  "
                  f"acc {row['train_acc']:.4f}{val}  {row['seconds']:.0f} s", flush=True)
        logged[name] = max(logged[name], len(rows))


def _logged_epochs(cfg) -> list[dict]:
    """The rows of a net's metrics.csv (none before its first epoch, or while it is being replaced)."""
    from reslab.train.state import METRICS, read_metrics

    try:
        return read_metrics(Path(cfg.out) / METRICS)
    except (OSError, ValueError):
        return []


def _work(name: str, cfg, train_one: Callable, resume: str | None, stop, halt, threads: int, results) -> None:
    """A worker process: train `cfg` with `train_one` (as the experiment does in turn) and send back
    its outcome."""
    import torch

    from reslab.errors import ReslabError

    # The terminal's Ctrl-C reaches this process too: the trainer checkpoints on it while it trains;
    # before and after, the parent's event decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)

    def hook(epoch: int, step: int) -> bool:
        return halt.is_set() or (stop is not None and stop(name, epoch, step))

    try:
        outcome = ("ok", train_one(dataclasses.replace(cfg, quiet=True), resume, hook))
    except ReslabError as err:
        outcome = ("error", str(err))
    except BaseException as err:  # noqa: BLE001 - reported by the parent, with the net's name
        outcome = ("error", f"{type(err).__name__}: {err} (pid {os.getpid()})")
    results.put((name, outcome))
