"""The training loop: set up once, then epochs of flat steps; a checkpoint is a plain dict.

    summary = train(TrainConfig(model="resnet20", data="digits"))

`train` claims the run directory, builds everything once (`_setup`: data, model, optimizer,
loaders, the resume state), then runs epochs: `train_one_epoch` (the steps), `evaluate` (loss
and accuracy over every rank's shard) and `_end_epoch` (metrics row, best weights, early stop,
files). The step itself is `make_step`: forward under autocast, loss, backward, step.

Exact resume: every random thing in an epoch is a pure function of (seed, epoch) (the loader,
mixup and cutmix included), the lr is a pure function of the step (schedule.py), and the state
holds the weights, the EMA weights, optimizer, partial-epoch sums and RNG; a run resumed at step k
then runs the very operations the uninterrupted run would have, so on the CPU the final weights
are bitwise equal.

A `--budget` run measures its step, evaluation and checkpoint times on copies of the model and
optimizer (`_measure`), then fixes the epochs that fit (`_plan_budget`); the real model, optimizer
and RNG are untouched by the measurement, so the run is the very run `--epochs N` would be.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.checkpoint import BEST, LAST, CheckpointMeta, read_weights, save_weights, unwrap
from reslab.data import balance
from reslab.data.augment import get_policy
from reslab.errors import ReslabError
from reslab.hardware import default_device, describe, resolve_precision, train_channels_last
from reslab.io import write_json
from reslab.train import distributed, lr_find
from reslab.train import state as run_files
from reslab.train.config import TrainConfig, format_duration
from reslab.train.distributed import DistContext
from reslab.train.schedule import budget_epochs, lr_multiplier, set_lr
from reslab.train.state import EpochRow, PartialEpoch, Progress
from reslab.train.tensorboard import event_log

# Host syncs (loss to Python for the progress bar and the NaN check) happen once per this many
# steps; a GPU step then never waits on the host.
SYNC_EVERY = 10
# The wall clock of budgets and epoch times (a test replaces it with a fake one).
clock = time.perf_counter
# A budget's measurement: steps run before timing (the first ones build kernels and allocate), and
# how long the timed steps run: this share of the budget, within the bounds, at least 3 steps.
BUDGET_WARMUP_STEPS = 2
BUDGET_MEASURE_SHARE, BUDGET_MEASURE_BOUNDS = 0.01, (1.0, 30.0)
BUDGET_MEASURE_EPOCHS = 10  # the most epochs of batches the measurement may run through
# curves.png is redrawn after an epoch only when it is this old (seconds), and when the run stops.
CURVES_EVERY = 30.0


class WeightEMA:
    """An exponential moving average of the weights (Polyak and Juditsky 1992; timm's ModelEmaV2):
    after every step each float tensor of the state dict (BatchNorm statistics included) moves
    towards the model's by 1 - d, with d = min(decay, (1 + step) / (10 + step)) so that the first
    steps do not average in the random initialization for long. A pure function of the steps, so
    its state in last.state.pt resumes it exactly."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for q in self.model.parameters():
            q.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        pairs = [(e, m) for e, m in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True)]
        floats = [(e, m) for e, m in pairs if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [m.detach() for _, m in floats], 1 - d)
        for e, m in pairs:
            if not e.is_floating_point():
                e.copy_(m)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Groups: weights / norms and biases (fast recipe: no decay, as Goyal et al. 2017 sec. 5.1
    and timm), the classifier at lr * head_lr_mult, and with `layer_decay` < 1 each earlier part of
    the body (stage, stem) at layer_decay times the next one's lr (discriminative fine-tuning, Howard
    and Ruder 2018). Parameters frozen by --freeze are left out."""
    head = {id(p) for p in model.get_classifier().parameters()}
    depth = _depth_below_top(model) if cfg.layer_decay != 1 else {}
    groups: dict[tuple[bool, int, bool], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        no_decay = cfg.no_decay_norm_bias and p.ndim <= 1
        is_head = id(p) in head and cfg.head_lr_mult != 1
        groups.setdefault((is_head, 0 if is_head else depth.get(id(p), 0), no_decay), []).append(p)
    param_groups = []
    for (is_head, below, no_decay), params in sorted(groups.items()):
        lr = cfg.lr * (cfg.head_lr_mult if is_head else cfg.layer_decay**below)
        param_groups.append({"params": params, "lr": lr, "base_lr": lr,
                             "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    if not param_groups:
        raise ReslabError(f"--freeze {cfg.freeze} leaves no trainable parameter; freeze fewer layers")
    # One fused kernel for all parameters instead of a Python loop over them (CPU and CUDA): ResNet-20's
    # SGD step 1.27 -> 0.21 ms on 1 thread (benchmarks/RESULTS.md, "Training step").
    fused = {"fused": True} if _fusable(param_groups) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fused)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=cfg.lr, **fused)


def _fusable(param_groups: list[dict]) -> bool:
    """Whether torch's fused optimizer kernels take these parameters (floating, on the CPU or CUDA)."""
    params = [p for group in param_groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _depth_below_top(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many parts (stages, then the stem) it sits below the last stage."""
    from reslab.transfer import body_parts

    parts = body_parts(model)  # stem, stage 1 .. stage N, then what follows the last stage
    last_stage = max(len(parts) - 2, 0)
    return {id(p): max(last_stage - i, 0) for i, (_, modules) in enumerate(parts) for m in modules
            for p in m.parameters()}


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str, grad_clip: float | None,
              loss_fn: Callable) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step as a function `step(x, y) -> (loss, correct)`, both 0-dim tensors on the device.

    Forward under bf16 autocast when `precision == "bf16"` (weights and the optimizer stay fp32),
    `loss_fn(logits, y)`, backward, optional global-norm clipping, step, zero_grad(set_to_none).
    `y` is class indices, or soft targets (N x classes, mixup/cutmix): then `correct` counts the
    predictions of each example's larger share. No `.item()`: the caller decides when to sync.
    """
    device_type = next(model.parameters()).device.type
    autocast = precision == "bf16"
    params = [p for p in model.parameters()]
    # Inception nets with aux_logits return (logits, *aux) in training; the paper weights each
    # auxiliary loss (GoogLeNet 0.3: Szegedy et al. 2014, section 5).
    aux_weights = getattr(unwrap(model), "aux_loss_weights", ())

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            loss = loss_fn(logits.float(), y)
            if isinstance(out, tuple):
                loss = loss + sum(w * loss_fn(a.float(), y) for w, a in zip(aux_weights, out[1:], strict=True))
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), (logits.argmax(1) == (y.argmax(1) if y.dim() > 1 else y)).sum()

    return step


@torch.inference_mode()
def evaluate_sums(model: nn.Module, loader, precision: str, confusion: torch.Tensor | None = None) -> torch.Tensor:
    """[loss sum, correct, count] over a loader (plain cross-entropy), as sums so ranks can add them;
    `confusion` (flat, classes x classes: true class by predicted), when given, gains the pass's counts."""
    model.eval()
    device_type = next(model.parameters()).device.type
    sums = torch.zeros(3, dtype=torch.float64, device=next(model.parameters()).device)
    for x, y in loader:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x).float()
        sums += torch.stack([nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                             (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=sums.device)])
        if confusion is not None:
            k = logits.shape[1]
            confusion += torch.bincount(y * k + logits.argmax(1), minlength=k * k)
    return sums


def evaluate(model: nn.Module, loader, precision: str, ctx: DistContext | None = None) -> dict[str, float]:
    """{"loss", "acc", "count", "balanced_accuracy", "macro_f1"} over `loader`; with several ranks, over
    all their shards together (the confusion matrix summed over ranks before the scores)."""
    k = unwrap(model).get_classifier().out_features
    confusion = torch.zeros(k * k, dtype=torch.float64, device=next(model.parameters()).device)
    sums = torch.cat([evaluate_sums(model, loader, precision, confusion), confusion]).tolist()
    if ctx is not None:
        sums = list(ctx.all_reduce_sums(dict(enumerate(sums))).values())
    loss, correct, count = sums[:3]
    return {"loss": loss / count, "acc": correct / count, "count": count, **balance.scores(sums[3:], k)}


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


class _Bar:
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


@dataclass
class Run:
    """What `_setup` builds once for the epochs."""

    cfg: TrainConfig
    ctx: DistContext
    dir: Path
    progress: Progress
    model: nn.Module  # the bare model: what checkpoints hold
    train_model: nn.Module  # `model` as trained: under DDP and torch.compile when asked
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable  # the criterion `step` uses (class-weighted with --class-weights balanced)
    loader: Any  # reslab.data.BatchLoader, this rank's share of every batch
    val_loader: Any | None
    test_loader: Any | None
    device: torch.device
    precision: str
    channels_last: bool
    weights_meta: dict  # what every weights file says about itself (CheckpointMeta fields)
    ema: WeightEMA | None = None
    record: dict = dataclasses.field(default_factory=dict)  # config.json's content besides the config
    budget: dict | None = None  # how a --budget run chose its epochs (config.json's "budget")
    curves_drawn: float | None = None  # clock() when curves.png was last drawn
    log: Any = None  # reslab.train.tensorboard.EventLog: rank 0 with --log tensorboard

    def set_lr(self, step: int) -> float:
        """The lr of global step `step` (0-based) set on the optimizer; returns the first group's.

        With head epochs (the finetune recipe) the schedule starts after them; during them only the
        head trains, on a cosine from its base lr."""
        steps, cfg = len(self.loader), self.cfg
        head = cfg.head_epochs * steps
        if step < head:
            return set_lr(self.optimizer, lr_multiplier("cosine", step, head))
        warmup = round(cfg.warmup_epochs * steps)
        return set_lr(self.optimizer, lr_multiplier(cfg.schedule, step - head, cfg.epochs * steps - head, warmup))

    def set_phase(self, epoch: int) -> None:
        """The finetune recipe's phases, a pure function of the epoch (so resume is exact): the body
        frozen, BatchNorm included, for the head epochs; then what --freeze says (default: nothing)."""
        if self.cfg.head_epochs:
            from reslab.transfer import freeze

            freeze(self.model, "all-but-head" if epoch < self.cfg.head_epochs else self.cfg.freeze or "none")

    def meta(self, epoch: int, val_acc: float | None, weights: str = "model") -> CheckpointMeta:
        # "flip": whether training mirrored the images; a model that never saw a mirror image is never
        # flipped at test time by default (reslab.inference.predictor.resolve_tta).
        extra = {"epoch": epoch, "val_acc": val_acc, "data": self.cfg.data, "seed": self.cfg.seed,
                 "val_split": self.cfg.val_split, "run": self.dir.name, "flip": self.record.get("flip")}
        if self.ema is not None:
            extra["weights"] = weights  # "ema": the exponential moving average of the weights
        return CheckpointMeta(**self.weights_meta, extra=extra)


def train(config: TrainConfig, *, ctx: DistContext | None = None,
          stop: Callable[[int, int], bool] | None = None) -> dict:
    """Train as `config` says; returns the summary dict (also in summary.json) with "run_dir".

    `stop(epoch, step)` (1-based) is asked after every step; True acts as Ctrl-C would: finish the
    step, checkpoint, return with summary["interrupted"] set. Only rank 0 of `ctx` writes files.
    """
    lr_find.check_new_run(config)
    if ctx is None:  # this process alone, `nproc` launched ones, or this rank of torchrun's job
        return distributed.run(train, config, stop=stop)
    started = clock()
    with _run_directory(config, ctx) as (cfg, run_dir, state), contextlib.ExitStack() as open_logs:
        run = _setup(cfg, ctx, run_dir, state)
        p = run.progress
        run.log = open_logs.enter_context(event_log(cfg.log, run_dir, p.global_step, ctx.is_main))
        with sigint_flag() as interrupted, _Bar(ctx.is_main and not cfg.quiet) as bar:
            for line in _photo_lines(config, cfg) + balance.imbalance_lines(run.record["classes"],
                                                                            run.loader.split.labels, cfg):
                bar.print(line)
            lr_find.before_training(run, bar, make_step, _saved_record(run_dir) if cfg.resume else {})  # --lr-find
            if cfg.epochs is None:
                _plan_budget(run, started, bar)
            _write_config(run)

            def halt(step: int) -> bool:
                return interrupted.is_set() or (stop is not None and stop(p.epoch + 1, step))

            if state is None and cfg.resume:
                bar.print(f"{run_dir} holds no checkpoint yet ({run_files.CONFIG} only): starting at step 1")
            elif state is not None:
                bar.print(f"resuming {run_dir} at epoch {p.epoch + 1}, step {p.step_in_epoch}")
            while p.stopped == "running" and p.epoch < run.cfg.epochs:
                trained = train_one_epoch(run, halt, bar)
                if trained is None:  # stopped after a step, checkpointed
                    break
                val = evaluate(run.model, run.val_loader, run.precision, ctx) if run.val_loader else None
                ema_val = evaluate(run.ema.model, run.val_loader, run.precision, ctx) if (
                    run.ema and run.val_loader) else None
                _end_epoch(run, trained, val, ema_val, bar)
        return _finish(run, started)


def train_one_epoch(run: Run, halt: Callable[[int], bool], bar: _Bar) -> dict[str, float] | None:
    """The epoch's steps (the rest of them when resuming mid-epoch); returns {"loss", "acc", "lr",
    "seconds"} over all ranks, or None when `halt(step)` stopped it (then progress holds the
    partial sums and the checkpoint is written)."""
    p, ctx = run.progress, run.ctx
    run.loader.set_epoch(p.epoch)
    run.train_model.train()
    run.set_phase(p.epoch)
    # An interrupted epoch's partial sums are all ranks' (see the end); rank 0 alone carries them on.
    before = p.partial
    loss_correct = torch.tensor([before.loss, before.correct] if ctx.is_main else [0.0, 0.0], dtype=torch.float64,
                                device=run.device)
    count = before.count if ctx.is_main else 0.0
    first_bad = torch.tensor(-1, device=run.device)  # step of the first non-finite loss; read every SYNC_EVERY
    bar.start_epoch(f"{p.epoch + 1}/{run.cfg.epochs}", len(run.loader), p.step_in_epoch)
    start = clock()
    lr, halted = run.set_lr(p.global_step), False
    for i, (x, y) in enumerate(run.loader):
        if i < p.step_in_epoch:  # resuming mid-epoch: the same batches, already trained on
            continue
        lr = run.set_lr(p.global_step)
        loss, correct = run.step(x, y)
        if run.ema is not None:
            run.ema.update(run.model, p.global_step)
        loss_correct += torch.stack([loss.double() * len(y), correct.double()])
        count += len(y)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i + 1, first_bad)
        p.global_step, p.step_in_epoch = p.global_step + 1, i + 1
        halted = ctx.any(halt(i + 1))  # every rank stops at the same step
        if halted or (i + 1) % SYNC_EVERY == 0 or i + 1 == len(run.loader):
            _stop_if_not_finite(run, int(first_bad), lr)
            if run.log is not None:
                run.log.step_loss(p.global_step, loss)
            loss_sum, correct_sum = loss_correct.tolist()
            elapsed = before.seconds + clock() - start
            bar.update(i + 1, loss_sum / count, correct_sum / count, count / max(elapsed, 1e-9))
        if halted:
            break
    # The job's time, the same on every rank: its slowest rank's (each rank's clock starts when it
    # enters the epoch, rank 0 after writing the last one's files).
    seconds = ctx.max(clock() - start)
    loss_sum, correct_sum = loss_correct.tolist()
    totals = ctx.all_reduce_sums({"loss": loss_sum, "correct": correct_sum, "count": count})
    p.train_seconds += seconds
    p.train_images += totals["count"] - before.count
    seconds += before.seconds
    if halted:
        p.partial, p.stopped = PartialEpoch(totals["loss"], totals["correct"], totals["count"], seconds), "interrupted"
        if ctx.is_main:
            _checkpoint(run)
        return None
    return {"loss": totals["loss"] / totals["count"], "acc": totals["correct"] / totals["count"], "lr": lr,
            "seconds": seconds}


def _stop_if_not_finite(run: Run, bad_step: int, lr: float) -> None:
    if run.ctx.any(bad_step >= 0):
        raise ReslabError(f"the loss became NaN or infinite at epoch {run.progress.epoch + 1}, step {bad_step} "
                          f"(lr {lr:.4g}); lower the lr (--lr, now {run.cfg.lr:g}) or add --grad-clip 1; "
                          f"the last good checkpoint in {run.dir} is untouched")


def _end_epoch(run: Run, trained: dict[str, float], val: dict[str, float] | None,
               ema_val: dict[str, float] | None, bar: _Bar) -> None:
    """Record a finished epoch: its metrics row, the best weights (the EMA's when they are the
    better), early stopping, the run's files."""
    p, cfg = run.progress, run.cfg
    p.epoch, p.step_in_epoch, p.partial = p.epoch + 1, 0, PartialEpoch()
    row = EpochRow(epoch=p.epoch, lr=trained["lr"], train_loss=trained["loss"], train_acc=trained["acc"],
                   val_loss=val["loss"] if val else None, val_acc=val["acc"] if val else None,
                   seconds=round(trained["seconds"], 3), ema_val_loss=ema_val["loss"] if ema_val else None,
                   ema_val_acc=ema_val["acc"] if ema_val else None)
    p.rows.append(row)
    # Best weights by validation accuracy, or balanced accuracy when the run corrects for imbalance.
    key = balance.selection_metric(cfg)
    source, chosen = "model", val
    if ema_val is not None and ema_val[key] > val[key]:
        source, chosen = "ema", ema_val
    acc = chosen["acc"] if chosen else None
    best = p.best_balanced_accuracy if key == "balanced_accuracy" else p.best_val_acc
    improved = chosen is not None and (best is None or chosen[key] > best)
    if improved:
        p.best_val_acc, p.best_epoch, p.bad_epochs, p.best_weights = acc, row.epoch, 0, source
        p.best_balanced_accuracy, p.best_macro_f1 = chosen["balanced_accuracy"], chosen["macro_f1"]
    elif acc is not None:
        p.bad_epochs += 1
    if cfg.early_stop is not None and p.bad_epochs >= cfg.early_stop:
        p.stopped = "early_stop"
    elif p.epoch >= cfg.epochs:
        p.stopped = "completed"
    if run.val_loader is None:  # no validation data: the best weights are the last ones (the EMA's if kept)
        source = "ema" if run.ema else "model"
        p.best_weights = source
    if run.ctx.is_main:
        if improved or run.val_loader is None:
            weights = run.ema.model if source == "ema" else run.model
            save_weights(run.dir / BEST, weights, run.meta(row.epoch, acc, weights=source))
        _checkpoint(run)
        # Drawing the curves costs a short epoch's worth of time: at most every CURVES_EVERY seconds,
        # and at the end.
        curves = p.stopped != "running" or run.curves_drawn is None or clock() - run.curves_drawn >= CURVES_EVERY
        _write_records(run, curves=curves)
        if run.log is not None:
            run.log.epoch(row, p.global_step, run.dir / run_files.CURVES if curves else None)

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    ema = f" (ema loss {fmt(row.ema_val_loss)} acc {fmt(row.ema_val_acc)})" if row.ema_val_acc is not None else ""
    bar.end_epoch(f"epoch {row.epoch}/{cfg.epochs}  lr {row.lr:.4g}  train loss {row.train_loss:.4f} "
                  f"acc {row.train_acc:.4f}  val loss {fmt(row.val_loss)} acc {fmt(row.val_acc)}{ema}  "
                  f"{row.seconds:.1f}s")
    if p.stopped == "early_stop":
        score, best = ("balanced accuracy", p.best_balanced_accuracy) if key == "balanced_accuracy" else (
            "accuracy", p.best_val_acc)
        bar.print(f"early stop: no better validation {score} for {cfg.early_stop} epochs "
                  f"(best {best:.4f} at epoch {p.best_epoch})")


def _finish(run: Run, started: float) -> dict:
    """The summary, also in summary.json; a run that reached its end is first tested on its best weights."""
    p, ctx = run.progress, run.ctx
    test = tta = None
    measure_tta = _flips(run)
    if p.stopped != "interrupted" and (run.test_loader is not None or measure_tta):
        if ctx.broadcast(p.best_epoch is not None and (run.dir / BEST).is_file()):
            if ctx.is_main:
                run.model.load_state_dict(read_weights(run.dir / BEST)[0])
            ctx.broadcast_state(run.model)
        if measure_tta:
            tta = _measure_tta(run)
        if run.test_loader is not None:
            test = evaluate(run.model, run.test_loader, run.precision, ctx)
    result = {**_summary(run, test), **(tta or {})}
    if run.budget is not None:
        result["budget"]["used_seconds"] = round(clock() - started, 1)
    if ctx.is_main and p.rows and p.stopped == "interrupted" and run.curves_drawn is not None:
        _draw_curves(run)  # the epochs since the last drawing
    if ctx.is_main:
        write_json(run.dir / run_files.SUMMARY, result)
    if run.log is not None and (run.val_loader or run.test_loader) is not None:
        run.log.samples(run.model, run.val_loader or run.test_loader, run.weights_meta["classes"], p.global_step)
    return result


# Test-time flip must beat no flip by more than this many standard errors of the paired difference,
# and by more than TTA_MIN_IMAGES images (see choose_tta).
TTA_MIN_SE, TTA_MIN_IMAGES = 2.0, 2


def choose_tta(gained: int, lost: int) -> bool:
    """Whether test-time flipping pays, from the validation images it turned right (`gained`) and
    wrong (`lost`) against no flipping (the images both get right or both get wrong say nothing).

    Flipping doubles the cost of every later prediction, so it has to pay clearly, not by chance.
    If it made no difference in expectation, each of the g + l images on which the two disagree
    would go either way with probability 1/2 (McNemar's test), so g - l has mean 0 and standard
    deviation sqrt(g + l). Flip is chosen when g - l exceeds TTA_MIN_SE = 2 of those standard
    errors (a chance gain that large is about 2% likely) and TTA_MIN_IMAGES = 2 images (with few
    disagreements the normal approximation fails, and one or two images are noise whatever the
    ratio). E.g. 12 gained and 5 lost: 7 > max(2, 2 x 4.1) is false, flip not chosen; 40 and 15: 25
    > 2 x 7.4, chosen."""
    return gained - lost > max(TTA_MIN_IMAGES, TTA_MIN_SE * (gained + lost) ** 0.5)


def flip_sums(model: nn.Module, loader, precision: str) -> torch.Tensor:
    """[count, correct without flip, correct with flip, gained, lost] over a loader, as sums so ranks
    can add them; "with flip" is reslab.inference.Predictor's --tta flip (flip_probabilities), from
    the same plain logits: two passes over the images, not three."""
    from reslab.inference.predictor import flip_average

    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
                plain = logits.argmax(1) == y
                flipped = flip_average(logits, model(x.flip(-1))).argmax(1) == y
            sums += torch.stack([torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                                 plain.sum().double(), flipped.sum().double(), (flipped & ~plain).sum().double(),
                                 (plain & ~flipped).sum().double()])
    return sums


def _flips(run: Run) -> bool:
    """Whether test-time flipping is worth measuring: a photo folder with a validation split, trained
    with mirrored images (a model that never saw a mirror image is not asked about one)."""
    from reslab.data.folder import is_image_folder

    return run.val_loader is not None and bool(run.record.get("flip")) and is_image_folder(run.cfg.data)


def _measure_tta(run: Run) -> dict:
    """Validation accuracy of the best weights (loaded in run.model) without and with "flip", and the
    images flipping turned right and wrong. If flipping pays by choose_tta's margin, best.safetensors
    records it (extra "tta") and evaluate/predict/serve use it by default; the accuracies are recorded
    either way (extra "tta_val_acc")."""
    keys = ("count", "none", "flip", "gained", "lost")
    sums = dict(zip(keys, flip_sums(run.model, run.val_loader, run.precision).tolist()))
    sums = run.ctx.all_reduce_sums(sums)
    gained, lost = round(sums["gained"]), round(sums["lost"])
    accs = {mode: sums[mode] / sums["count"] for mode in ("none", "flip")}
    chosen = "flip" if choose_tta(gained, lost) else "none"
    if run.ctx.is_main and (run.dir / BEST).is_file():
        meta = read_weights(run.dir / BEST)[1]
        meta.extra.update(tta=chosen, tta_val_acc=accs, tta_gained_lost=[gained, lost])
        save_weights(run.dir / BEST, run.model, meta)
    return {"tta": chosen, "tta_val_acc": accs, "tta_gained_lost": [gained, lost]}


# --- set-up ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _run_directory(config: TrainConfig, ctx: DistContext) -> Iterator[tuple[TrainConfig, Path, dict | None]]:
    """The resolved config, the run directory and its resume state (None: start at step 1), while
    rank 0 holds the directory's lock (reslab.train.state.RunLock)."""
    with contextlib.ExitStack() as held:
        if config.resume:
            run_dir = Path(config.resume)
            saved = None
            if ctx.is_main:
                saved = run_files.read_config(run_dir)  # refuses a folder that holds no run
                held.enter_context(run_files.RunLock(run_dir, "--resume"))
                run_files.remove_partial_writes(run_dir)
            cfg = _resumed_config(config, ctx.broadcast(saved), run_dir)
            state = run_files.load_state(run_dir)  # every rank, once rank 0 holds the lock
        else:
            cfg, state, run_dir = config.resolve(), None, None
            if ctx.is_main:  # rank 0 names the run (a timestamp) and checks --out; every rank uses its answer
                run_dir, lock = run_files.claim_run_dir(cfg.out, cfg.model, cfg.data)
                held.enter_context(lock)
            run_dir = ctx.broadcast(run_dir)
        yield cfg, run_dir, state


def _resumed_config(config: TrainConfig, saved: dict, run_dir: Path) -> TrainConfig:
    """The run's saved config, with what --resume may change (reslab.cli.train.RESUME_OPTIONS)."""
    if "ema" not in saved:  # saved before the photo-folder defaults existed: it ran without them
        saved = {"random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0, "ema": 0.0, **saved}
        if saved.get("augment") is None and saved.get("recipe", "fast") == "fast" and not saved.get("pretrained"):
            saved["augment"] = _saved_record(run_dir).get("augment")
    if "flip" not in saved:  # saved before --flip: it ran with its policy's own mirror, whatever today's defaults
        augment = saved.get("augment") or _saved_record(run_dir).get("augment")
        saved = {**saved, "flip": get_policy(augment).flip if augment else None}
    cfg = TrainConfig.from_dict(saved)
    cfg.resume, cfg.quiet, cfg.out = str(run_dir), config.quiet, str(run_dir)
    cfg.nproc, cfg.dist_timeout = config.nproc, config.dist_timeout  # may differ from the first run's
    if config.device is not None:
        cfg.device = config.device
    if config.epochs is not None and config.epochs != cfg.epochs:
        # A new length: the lr schedule stretches to it (so this resume is not exact by design).
        cfg.epochs = config.epochs
        cfg.warmup_epochs = min(cfg.warmup_epochs, cfg.epochs)
    return cfg.resolve()


def _setup(cfg: TrainConfig, ctx: DistContext, run_dir: Path, state: dict | None) -> Run:
    """Data, model, optimizer, step and loaders, built once; the resume state loaded; config.json written."""
    device = ctx.device(cfg.device or default_device())
    precision = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else train_channels_last(precision, device)
    bundle = _load_data(cfg, ctx)
    model, model_options, reports, normalization = _build_model(cfg, bundle, quiet=cfg.quiet or not ctx.is_main)
    preprocessing = {**bundle.preprocessing(), **(normalization or {})}
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # --batch-size is global (split over ranks) unless --scale-lr: see reslab.train.distributed.
    plan = distributed.plan_batches(cfg.batch_size, cfg.lr, ctx.world_size, scale_lr=cfg.scale_lr)
    optimizer = build_optimizer(model, dataclasses.replace(cfg, lr=plan.lr))
    train_model = model
    if ctx.enabled and ctx.world_size > 1:
        # The head epochs leave the body without gradients: DDP must expect unused parameters.
        train_model = distributed.wrap(model, ctx, sync_bn=cfg.sync_bn, find_unused_parameters=cfg.head_epochs > 0)
    if cfg.compile:
        train_model = torch.compile(train_model)
    loss_fn = balance.criterion(cfg, bundle.train.labels, len(bundle.classes), device)  # --class-weights
    step = make_step(train_model, optimizer, precision=precision, grad_clip=cfg.grad_clip, loss_fn=loss_fn)
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None

    progress = Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        run_files.set_rng_state(state["rng"])
        progress = Progress.from_state(state)
        # An interrupted run goes on; so does a completed one given more --epochs.
        if progress.stopped == "interrupted" or (progress.stopped == "completed" and progress.epoch < cfg.epochs):
            progress.stopped = "running"
    augment = cfg.augment or bundle.augment
    flip = get_policy(augment, cfg.flip).flip  # what the training images really get (--flip/--no-flip)
    loaders = _loaders(cfg, ctx, bundle, plan.per_rank_batch, augment=augment, device=device,
                       channels_last=channels_last, mean=preprocessing["mean"], std=preprocessing["std"])
    record = {"data": bundle.source, "classes": list(bundle.classes), "preprocessing": preprocessing,
              "augment": augment, "flip": flip, "precision": precision, "channels_last": channels_last,
              "hardware": describe(), "world_size": ctx.world_size, **reports,
              "train_class_counts": dict(zip(bundle.classes, balance.class_counts(bundle.train.labels,
                                                                                  len(bundle.classes))))}
    weights_meta = dict(model=cfg.model, model_options=model_options, classes=list(bundle.classes),
                        preprocessing=preprocessing)
    budget = _saved_record(run_dir).get("budget") if cfg.resume else None
    return Run(cfg=cfg, ctx=ctx, dir=run_dir, progress=progress, model=model, train_model=train_model,
               optimizer=optimizer, step=step, loss_fn=loss_fn, **loaders, device=device, precision=precision,
               channels_last=channels_last, weights_meta=weights_meta, ema=ema, record=record, budget=budget)


def _photo_lines(given: TrainConfig, cfg: TrainConfig) -> list[str]:
    """What the photo-folder defaults chose for a new run, and why (nothing when none applied)."""
    from reslab.data.folder import photo_choice
    from reslab.train.config import photo_defaults

    if given.resume:
        return []
    chosen = {k: v for k, v in photo_defaults(given).items() if getattr(given, k) is None}
    if not chosen:
        return []
    parts = []
    if "model" in chosen:
        stem = f" ({cfg.stem} stem)" if cfg.stem else ""
        parts.append(f"{cfg.model}{stem} at {cfg.image_size} px")
    if "epochs" in chosen:
        parts.append(f"{cfg.epochs} epochs")
    if "lr" in chosen:
        parts.append(f"--lr {cfg.lr:g}")
    parts += [f"--augment {cfg.augment}"] if "augment" in chosen else []
    parts += ["--no-flip"] if chosen.get("flip") is False else []
    parts += [f"--{k.replace('_', '-')} {getattr(cfg, k):g}" for k in ("random_erasing", "mixup", "cutmix", "ema")
              if k in chosen]
    why = photo_choice(given.data)[1]
    return [f"photo folder from scratch ({why}): {', '.join(parts)}: what learned best within a time budget on "
            "2 CPU cores (README, \"Train on your own photos\"); the options of the same names override them"]


def _plan_budget(run: Run, started: float, bar: _Bar) -> None:
    """Fix the epochs of a --budget run from this machine's measured step, evaluation and checkpoint
    times: as many whole epochs as fit before the budget ends, the test pass (and the measure of
    test-time flipping) included."""
    cfg, ctx = run.cfg, run.ctx
    times = _measure(run)
    steps = len(run.loader)
    test = len(run.test_loader.split) if run.test_loader is not None else 0
    epoch_seconds = steps * times["step"] + (2 if run.ema else 1) * times["eval_pass"] + times["overhead"]
    final_seconds = test * times["eval_image"] + (2 * times["eval_pass"] if _flips(run) else 0.0)  # + tta
    spent = clock() - started
    epochs = ctx.broadcast(budget_epochs(cfg.budget, spent, epoch_seconds, final_seconds))  # rank 0's decides
    budget = format_duration(cfg.budget)
    if epochs <= cfg.head_epochs:
        least = spent + (cfg.head_epochs + 1) * epoch_seconds + final_seconds
        raise ReslabError(f"--budget {budget}: one epoch of {cfg.model} on {cfg.data} takes about "
                          f"{epoch_seconds:.0f} s on this machine (measured; {spent:.0f} s went to loading and "
                          f"measuring), so no {'training' if not cfg.head_epochs else 'epoch after the head epochs'} "
                          f"fits; give at least --budget {format_duration(60 * -(-least // 60))}, or --epochs")
    run.cfg = cfg.with_epochs(epochs)
    run.budget = {"seconds": cfg.budget, "epochs": epochs, "steps_per_epoch": steps,
                  "step_seconds": round(times["step"], 4), "epoch_seconds": round(epoch_seconds, 2),
                  "final_seconds": round(final_seconds, 2), "setup_seconds": round(spent, 1),
                  "planned_seconds": round(spent + epochs * epoch_seconds + final_seconds, 1),
                  "measured_steps": times["steps"]}
    bar.print(f"budget {budget}: {epochs} epochs of {steps} steps ({times['step']:.3g} s a step over "
              f"{times['steps']} measured steps, {epoch_seconds:.1f} s an epoch with evaluation and checkpoint; "
              f"{spent:.0f} s to load and measure)")


def _measure(run: Run) -> dict:
    """Seconds per training step (augmentation, forward, backward, step, EMA), of one validation
    pass, per evaluated image, and of one epoch's files (checkpoint, best weights, records), timed
    on copies: the run's model, optimizer, EMA, RNG and files are left as they were."""
    cfg = run.cfg
    model, optimizer = copy.deepcopy((run.model, run.optimizer))  # one memo: the copy optimizes the copy
    ema = copy.deepcopy(run.ema)
    step = make_step(model, optimizer, precision=run.precision, grad_clip=cfg.grad_clip, loss_fn=run.loss_fn)
    rng = torch.get_rng_state()
    window = min(max(BUDGET_MEASURE_SHARE * cfg.budget, BUDGET_MEASURE_BOUNDS[0]), BUDGET_MEASURE_BOUNDS[1])
    model.train()

    def batches():  # epoch 0's batches, then epoch 1's ...: short epochs are measured over several
        for epoch in range(BUDGET_MEASURE_EPOCHS):
            run.loader.set_epoch(epoch)
            yield from run.loader

    timed, start = 0, clock()
    for i, (x, y) in enumerate(batches()):
        if i == BUDGET_WARMUP_STEPS:
            timed, start = 0, clock()
        step(x, y)
        if ema is not None:
            ema.update(model, i)
        timed += 1
        if i >= BUDGET_WARMUP_STEPS and timed >= 3 and clock() - start >= window:
            break
    step_seconds = (clock() - start) / timed
    eval_loader = run.val_loader or run.test_loader
    eval_pass = eval_image = 0.0
    if eval_loader is not None:
        evaluate_sums(model, [next(iter(eval_loader))], run.precision)  # the first batch builds kernels
        t = clock()
        evaluate_sums(model, eval_loader, run.precision)
        eval_pass = clock() - t
        eval_image = eval_pass / len(eval_loader.split)
    with tempfile.TemporaryDirectory() as tmp:
        # What _end_epoch writes, written by a shadow of the run into a scratch folder.
        rows = [EpochRow(e, 0.1, 1 / e, 0.5, 1 / e, 0.5, 1.0) for e in range(1, 21)]
        shadow = dataclasses.replace(run, dir=Path(tmp), model=model, optimizer=optimizer, ema=ema,
                                     progress=Progress(epoch=len(rows), rows=rows))
        t = clock()
        save_weights(shadow.dir / BEST, model, shadow.meta(1, 0.5))
        _checkpoint(shadow)
        _write_records(shadow, curves=False)
        files = clock() - t
        _draw_curves(shadow)
        curves = clock() - t - files
    torch.set_rng_state(rng)
    epoch = len(run.loader) * step_seconds + (2 if ema else 1) * eval_pass + files
    return {"step": step_seconds, "eval_pass": eval_pass if run.val_loader is not None else 0.0,
            "eval_image": eval_image, "steps": timed,
            # The curves are drawn after at most every CURVES_EVERY seconds' epochs.
            "overhead": files + curves * min(1.0, epoch / CURVES_EVERY)}


def _write_config(run: Run) -> None:
    """config.json: the resolved config (its epochs fixed), what the data and machine were, and for a
    --budget run how the epochs were chosen."""
    if run.ctx.is_main:
        budget = {"budget": run.budget} if run.budget is not None else {}
        write_json(run.dir / run_files.CONFIG, {"config": run.cfg.to_dict(), **run.record, **budget})


def _saved_record(run_dir: Path) -> dict:
    """A run's whole config.json ({} when unreadable: read_config has vouched for it already)."""
    try:
        record = json.loads((run_dir / run_files.CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _load_data(cfg: TrainConfig, ctx: DistContext):
    from reslab.data import load_data
    from reslab.models import get_model_spec

    with ctx.local_main_first():  # one download or decode cache per machine
        bundle = load_data(cfg.data, image_size=cfg.image_size or get_model_spec(cfg.model).image_size,
                           val_split=cfg.val_split, seed=cfg.seed, data_dir=cfg.data_dir,
                           quiet=cfg.quiet or not ctx.is_main)
    if cfg.batch_size > len(bundle.train):
        raise ReslabError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(bundle.train)} "
                          f"images of {cfg.data}); give at most {len(bundle.train)}")
    if cfg.early_stop is not None and bundle.val is None:
        raise ReslabError(f"--early-stop watches validation accuracy but {cfg.data} has no validation split; "
                          "add --val-split (e.g. 0.1)")
    return bundle


def _loaders(cfg: TrainConfig, ctx: DistContext, bundle, batch: int, *, augment: str, **options) -> dict:
    """This rank's training loader (`batch` a step) and its validation and test shards."""
    from reslab.data import BatchLoader

    # A last batch of one example would make BatchNorm's batch variance undefined; drop just that.
    per_rank = -(-len(bundle.train) // ctx.world_size)
    loader = balance.loader_class(cfg.sampler)  # --sampler balanced: a class-balanced draw each epoch
    train = loader(bundle.train, batch, shuffle=True, seed=cfg.seed, augment=augment, flip=cfg.flip,
                   drop_last=per_rank % batch == 1, rank=ctx.rank, world_size=ctx.world_size,
                   erasing=cfg.random_erasing, mixup=cfg.mixup, cutmix=cfg.cutmix,
                   num_classes=len(bundle.classes), **options)

    def shard(split):
        if split is None:
            return None
        # Disjoint, unpadded shards: every example counted once (the sums are reduced afterwards).
        mine = split if ctx.world_size == 1 else split.subset(distributed.shard_indices(len(split), ctx))
        return BatchLoader(mine, max(batch, 256), shuffle=False, **options)

    return {"loader": train, "val_loader": shard(bundle.val), "test_loader": shard(bundle.test)}


def _build_model(cfg: TrainConfig, bundle, *, quiet: bool) -> tuple[nn.Module, dict, dict, dict | None]:
    """The model (seeded), its create_model options, the reports of pretrained loading and freezing,
    and the normalization the pretrained weights were trained with (None: the data's own)."""
    from reslab.models import create_model

    torch.manual_seed(cfg.seed)
    options = {"in_channels": bundle.in_channels}
    if cfg.shortcut is not None:
        options["shortcut"] = cfg.shortcut
    if cfg.stem is not None:
        options["stem"] = cfg.stem
    if cfg.aux_logits:
        options["aux_logits"] = True
    plan = None
    if cfg.pretrained:
        from reslab.weights import pretrained_plan

        # Keras weights need stride_in_1x1=True, torchvision's Inception weights transform_input...
        plan = pretrained_plan(cfg.pretrained, cfg.model)
        options = {**plan.model_options, **options}
    model = create_model(cfg.model, num_classes=len(bundle.classes), **options)
    reports, normalization = {}, None
    if plan is not None:
        from reslab.transfer import freeze

        reports["pretrained"] = plan.load(model, model_name=cfg.model, sha256=cfg.pretrained_sha256, quiet=quiet)
        if plan.normalization and len(plan.normalization["mean"]) == bundle.in_channels:
            normalization = plan.normalization  # the statistics the weights learned with, not the data's
        if cfg.freeze:
            reports["freeze"] = freeze(model, cfg.freeze)
    return model, options, reports, normalization


# --- records ---------------------------------------------------------------------------------


def _checkpoint(run: Run) -> None:
    p = run.progress
    save_weights(run.dir / LAST, run.model, run.meta(p.epoch, p.rows[-1].val_acc if p.rows else None))
    ema = {"ema": run.ema.model.state_dict()} if run.ema is not None else {}
    run_files.save_state(run.dir / run_files.STATE, {**p.to_state(), "model": run.model.state_dict(),
                                                     "optimizer": run.optimizer.state_dict(),
                                                     "rng": run_files.rng_state(), **ema})


def _summary(run: Run, test: dict[str, float] | None = None) -> dict:
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


def _write_records(run: Run, curves: bool = True) -> None:
    run_files.write_metrics(run.dir / run_files.METRICS, run.progress.rows)
    write_json(run.dir / run_files.SUMMARY, _summary(run))
    if curves:
        _draw_curves(run)


def _draw_curves(run: Run) -> None:
    from reslab import plots

    plots.curves(run.dir / run_files.CURVES, [row.values() for row in run.progress.rows])
    run.curves_drawn = clock()
