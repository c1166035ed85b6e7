"""What a training run shows and hears while it runs: a progress bar per epoch, Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigint_flag():
    """Ctrl-C sets a flag (the loop finishes its step and checkpoints); a second Ctrl-C aborts."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class EpochBar:
    """A rich bar per epoch and one line per epoch that stays; silent on ranks > 0 and with --quiet."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            from reslab.console import live_bars_work

            self.console = Console(stderr=True)
            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}  {task.fields[ips]:.0f} img/s"),
                TimeRemainingColumn(), console=self.console, transient=True,
                disable=not live_bars_work(self.console),
            )

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def start_epoch(self, label: str, total: int, done: int) -> None:
        if self.bar:
            self.task = self.bar.add_task("", total=total, completed=done, epoch=label, loss=0.0, acc=0.0, ips=0.0)

    def update(self, done: int, loss: float, acc: float, ips: float) -> None:
        if self.bar:
            self.bar.update(self.task, completed=done, loss=loss, acc=acc, ips=ips)

    def end_epoch(self, line: str) -> None:
        if self.bar:
            self.bar.remove_task(self.task)
            self.console.print(line, highlight=False, soft_wrap=True)

    def print(self, line: str) -> None:
        if self.enabled:
            self.console.print(line, highlight=False, soft_wrap=True)

