"""The training loop: readable top to bottom, one flat step, a checkpoint as a plain dict.

    summary = train(TrainConfig(model="resnet20", data="digits"))

Exact resume: every random thing in an epoch is a pure function of (seed, epoch) (the loader),
the lr is a pure function of the step (schedule.py), and the state holds the weights, optimizer,
partial-epoch sums and RNG; a run resumed at step k then runs the very operations the
uninterrupted run would have, so on the CPU the final weights are bitwise equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from reslab.checkpoint import BEST, LAST, CheckpointMeta, read_weights, save_weights
from reslab.errors import ReslabError
from reslab.hardware import default_device, describe, resolve_precision, train_channels_last
from reslab.io import write_json
from reslab.train import distributed
from reslab.train import state as run_files
from reslab.train.config import TrainConfig
from reslab.train.distributed import DistContext
from reslab.train.schedule import lr_multiplier, set_lr

# Host syncs (loss to Python for the progress bar and the NaN check) happen once per this many
# steps; a GPU step then never waits on the host.
SYNC_EVERY = 10


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Groups: weights / norms and biases (fast recipe: no decay, as Goyal et al. 2017 sec. 5.1
    and timm), and the classifier at lr * head_lr_mult. Frozen parameters are left out."""
    head = {id(p) for p in model.get_classifier().parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        no_decay = cfg.no_decay_norm_bias and p.ndim <= 1
        groups.setdefault((id(p) in head and cfg.head_lr_mult != 1, no_decay), []).append(p)
    param_groups = []
    for (is_head, no_decay), params in sorted(groups.items()):
        lr = cfg.lr * (cfg.head_lr_mult if is_head else 1.0)
        param_groups.append({"params": params, "lr": lr, "base_lr": lr,
                             "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    if not param_groups:
        raise ReslabError(f"--freeze {cfg.freeze} leaves no trainable parameter; freeze fewer layers")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=cfg.lr)


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str, grad_clip: float | None,
              loss_fn: Callable) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step as a function `step(x, y) -> (loss, correct)`, both 0-dim tensors on the device.

    Forward under bf16 autocast when `precision == "bf16"` (weights and the optimizer stay fp32),
    backward, optional global-norm clipping, step, zero_grad(set_to_none). No `.item()`: the
    caller decides when to sync.
    """
    device_type = next(model.parameters()).device.type
    autocast = precision == "bf16"
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), (logits.argmax(1) == y).sum()

    return step


@torch.inference_mode()
def evaluate_sums(model: nn.Module, loader, precision: str) -> torch.Tensor:
    """[loss sum, correct, count] over a loader (plain cross-entropy), as sums so ranks can add them."""
    model.eval()
    device_type = next(model.parameters()).device.type
    sums = torch.zeros(3, dtype=torch.float64, device=next(model.parameters()).device)
    for x, y in loader:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x).float()
        sums += torch.stack([nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                             (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=sums.device)])
    return sums


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


class _Progress:
    """A rich bar per epoch and one line per epoch that stays; silent on ranks > 0 and with --quiet."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = Console(stderr=True)
            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}  {task.fields[ips]:.0f} img/s"),
                TimeRemainingColumn(), console=self.console, transient=True,
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


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _load_resume(config: TrainConfig) -> tuple[TrainConfig, dict, Path]:
    import json

    run_dir = Path(config.resume)
    state = run_files.load_state(run_dir)
    try:
        saved = json.loads((run_dir / run_files.CONFIG).read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise ReslabError(f"--resume {run_dir}: {run_files.CONFIG} is damaged; the run cannot be resumed") from None
    cfg = TrainConfig.from_dict(saved)
    cfg.resume, cfg.quiet, cfg.out = str(run_dir), config.quiet, str(run_dir)
    cfg.nproc, cfg.dist_timeout = config.nproc, config.dist_timeout  # may differ from the first run's
    if config.epochs is not None and config.epochs != cfg.epochs:
        # A new length: the lr schedule stretches to it (so this resume is not exact by design).
        cfg.epochs = config.epochs
        cfg.warmup_epochs = min(cfg.warmup_epochs, cfg.epochs)
    return cfg.resolve(), state, run_dir


def train(config: TrainConfig, *, ctx: DistContext | None = None,
          stop: Callable[[int, int], bool] | None = None) -> dict:
    """Train as `config` says; returns the summary dict (also in summary.json) with "run_dir".

    `stop(epoch, step)` (1-based) is asked after every step; True acts as Ctrl-C would: finish the
    step, checkpoint, return with summary["interrupted"] set. Only rank 0 of `ctx` writes files.
    """
    if ctx is None:  # this process alone, `nproc` spawned ones, or this rank of torchrun's job
        return distributed.run(train, config, stop=stop)
    if config.resume:
        cfg, state, run_dir = _load_resume(config)
    else:
        cfg, state = config.resolve(), None
        # Rank 0 names the run (a timestamp) and checks --out; every rank uses its answer.
        run_dir = ctx.broadcast(run_files.new_run_dir(cfg.out, cfg.model, cfg.data) if ctx.is_main else None)
    main = ctx.is_main
    device = ctx.device(cfg.device or default_device())
    precision = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else train_channels_last(precision, device)

    from reslab.data import BatchLoader, load_data
    from reslab.models import create_model, get_model_spec

    spec = get_model_spec(cfg.model)
    with ctx.local_main_first():  # one download or decode cache per machine
        bundle = load_data(cfg.data, image_size=cfg.image_size or spec.image_size, val_split=cfg.val_split,
                           seed=cfg.seed, data_dir=cfg.data_dir, quiet=cfg.quiet or not main)
    if cfg.batch_size > len(bundle.train):
        raise ReslabError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(bundle.train)} "
                          f"images of {cfg.data}); give at most {len(bundle.train)}")
    if cfg.early_stop is not None and bundle.val is None:
        raise ReslabError(f"--early-stop watches validation accuracy but {cfg.data} has no validation split; "
                          "add --val-split (e.g. 0.1)")

    torch.manual_seed(cfg.seed)
    model_options = {"in_channels": bundle.in_channels}
    if cfg.shortcut is not None:
        model_options["shortcut"] = cfg.shortcut
    if cfg.pretrained:
        from reslab.transfer import model_options_for

        # Keras weights need stride_in_1x1=True; a reslab checkpoint brings its own options.
        model_options = {**model_options_for(cfg.pretrained), **model_options}
    model = create_model(cfg.model, num_classes=len(bundle.classes), **model_options)
    reports = {}
    if cfg.pretrained:
        from reslab.transfer import load_pretrained

        reports["pretrained"] = load_pretrained(model, cfg.pretrained, model_name=cfg.model,
                                                sha256=cfg.pretrained_sha256, quiet=cfg.quiet or not main)
        if cfg.freeze:
            from reslab.transfer import freeze

            reports["freeze"] = freeze(model, cfg.freeze)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # --batch-size is global (split over ranks) unless --scale-lr: see reslab.train.distributed.
    plan = distributed.plan_batches(cfg.batch_size, cfg.lr, ctx.world_size, scale_lr=cfg.scale_lr)
    optimizer = build_optimizer(model, dataclasses.replace(cfg, lr=plan.lr))

    per_rank_batch = plan.per_rank_batch
    augment = cfg.augment or bundle.augment
    loader_options = dict(mean=bundle.mean, std=bundle.std, device=device, channels_last=channels_last)
    # A last batch of one example would make BatchNorm's batch variance undefined; drop just that.
    per_rank = -(-len(bundle.train) // ctx.world_size)
    loader = BatchLoader(bundle.train, per_rank_batch, shuffle=True, seed=cfg.seed, augment=augment,
                         drop_last=per_rank % per_rank_batch == 1, rank=ctx.rank, world_size=ctx.world_size,
                         **loader_options)

    def eval_loader(split):
        # Disjoint, unpadded shards: every example counted once (the sums are reduced afterwards).
        shard = split if ctx.world_size == 1 else split.subset(distributed.shard_indices(len(split), ctx))
        return BatchLoader(shard, max(per_rank_batch, 256), shuffle=False, **loader_options)

    val_loader = eval_loader(bundle.val) if bundle.val is not None else None
    train_model = model
    if ctx.enabled and ctx.world_size > 1:
        train_model = distributed.wrap(model, ctx, sync_bn=cfg.sync_bn)
    if cfg.compile:
        train_model = torch.compile(train_model)
    step = make_step(train_model, optimizer, precision=precision, grad_clip=cfg.grad_clip,
                     loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))

    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    progress_state = dict(epoch=0, step_in_epoch=0, global_step=0, partial=[0.0, 0.0, 0.0, 0.0], rows=[],
                          best_val_acc=None, best_epoch=None, bad_epochs=0, train_seconds=0.0, train_images=0.0,
                          stopped="running")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run_files.set_rng_state(state["rng"])
        progress_state.update({k: state[k] for k in progress_state if k in state})
        # An interrupted run goes on; so does a completed one given more --epochs.
        if progress_state["stopped"] == "interrupted" or (
                progress_state["stopped"] == "completed" and progress_state["epoch"] < cfg.epochs):
            progress_state["stopped"] = "running"
    p = progress_state

    meta_base = dict(model=cfg.model, model_options=model_options, classes=list(bundle.classes),
                     preprocessing=bundle.preprocessing())

    def meta(epoch: int, val_acc: float | None) -> CheckpointMeta:
        return CheckpointMeta(**meta_base, extra={"epoch": epoch, "val_acc": val_acc, "data": cfg.data,
                                                  "seed": cfg.seed, "val_split": cfg.val_split,
                                                  "run": run_dir.name})

    def checkpoint() -> None:
        save_weights(run_dir / LAST, model, meta(p["epoch"], p["rows"][-1][5] if p["rows"] else None))
        run_files.save_state(run_dir / run_files.STATE, {
            **p, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": run_files.rng_state()})

    def summary(test: dict | None = None) -> dict:
        rows = p["rows"]
        return {
            "model": cfg.model, "data": cfg.data, "epochs": len(rows), "planned_epochs": cfg.epochs,
            "best_val_acc": p["best_val_acc"], "best_epoch": p["best_epoch"],
            "final_val_acc": rows[-1][5] if rows else None,
            "final_train_acc": rows[-1][3] if rows else None,
            "test_acc": (test or {}).get("acc"), "test_loss": (test or {}).get("loss"),
            "train_seconds": round(p["train_seconds"], 3),
            "images_per_second": round(p["train_images"] / p["train_seconds"], 1) if p["train_seconds"] else None,
            "precision": precision, "channels_last": channels_last, "device": str(device),
            "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
            "frozen_params": sum(q.numel() for q in model.parameters() if not q.requires_grad),
            "stopped": p["stopped"], "interrupted": p["stopped"] == "interrupted", "run_dir": str(run_dir),
        }

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / run_files.CONFIG, {
            "config": cfg.to_dict(), "data": bundle.source, "classes": list(bundle.classes),
            "preprocessing": bundle.preprocessing(), "augment": augment, "precision": precision,
            "channels_last": channels_last, "hardware": describe(), "world_size": ctx.world_size, **reports,
        })

    with sigint_flag() as interrupted, _Progress(main and not cfg.quiet) as bar:
        if state is not None:
            bar.print(f"resuming {run_dir} at epoch {p['epoch'] + 1}, step {p['step_in_epoch']}")
        while p["epoch"] < cfg.epochs and p["stopped"] == "running":
            epoch = p["epoch"]
            label = f"{epoch + 1}/{cfg.epochs}"
            loader.set_epoch(epoch)
            train_model.train()
            # An interrupted epoch's partial sums are all ranks' (see halt below); rank 0 carries them.
            sums = torch.tensor(p["partial"][:3] if main else [0.0] * 3, dtype=torch.float64, device=device)
            epoch_seconds, start_count = p["partial"][3], p["partial"][2]
            first_bad = torch.tensor(-1, device=device)
            bar.start_epoch(label, steps_per_epoch, p["step_in_epoch"])
            start = time.perf_counter()
            lr = set_lr(optimizer, lr_multiplier(cfg.schedule, p["global_step"], total_steps, warmup_steps))
            for i, (x, y) in enumerate(loader):
                if i < p["step_in_epoch"]:  # resuming mid-epoch: the same batches, already trained on
                    continue
                lr = set_lr(optimizer, lr_multiplier(cfg.schedule, p["global_step"], total_steps, warmup_steps))
                loss, correct = step(x, y)
                sums += torch.stack([loss.double() * len(y), correct.double(),
                                     torch.tensor(len(y), dtype=torch.float64, device=device)])
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i + 1, first_bad)
                p["global_step"] += 1
                distributed.maybe_inject_crash(ctx, p["global_step"])
                p["step_in_epoch"] = i + 1
                halt = interrupted.is_set() or (stop is not None and stop(epoch + 1, i + 1))
                halt = ctx.any(halt)  # every rank stops at the same step
                if (i + 1) % SYNC_EVERY == 0 or i + 1 == steps_per_epoch or halt:
                    bad = int(first_bad)
                    if ctx.any(bad >= 0):
                        raise ReslabError(f"the loss became NaN or infinite at epoch {epoch + 1}, step {bad} "
                                          f"(lr {lr:.4g}); lower the lr (--lr, now {cfg.lr:g}) or add --grad-clip 1; "
                                          f"the last good checkpoint in {run_dir} is untouched")
                    loss_sum, correct_sum, count = sums.tolist()
                    elapsed = epoch_seconds + time.perf_counter() - start
                    bar.update(i + 1, loss_sum / count, correct_sum / count, count / max(elapsed, 1e-9))
                if halt:
                    seconds = time.perf_counter() - start
                    partial = list(ctx.all_reduce_sums(dict(zip(("loss", "correct", "count"), sums.tolist()))).values())
                    p["partial"] = [*partial, epoch_seconds + seconds]
                    p["train_seconds"] += seconds
                    p["train_images"] += partial[2] - start_count
                    p["stopped"] = "interrupted"
                    if main:
                        checkpoint()
                    break
            if p["stopped"] == "interrupted":
                break
            seconds = time.perf_counter() - start
            totals = ctx.all_reduce_sums(dict(zip(("loss", "correct", "count"), sums.tolist())))
            p["train_seconds"] += seconds
            p["train_images"] += totals["count"] - start_count
            val_loss = val_acc = None
            if val_loader is not None:
                v = ctx.all_reduce_sums(dict(zip(("loss", "correct", "count"),
                                                 evaluate_sums(model, val_loader, precision).tolist())))
                val_loss, val_acc = v["loss"] / v["count"], v["correct"] / v["count"]
            p["epoch"], p["step_in_epoch"], p["partial"] = epoch + 1, 0, [0.0, 0.0, 0.0, 0.0]
            row = [epoch + 1, lr, totals["loss"] / totals["count"], totals["correct"] / totals["count"],
                   val_loss, val_acc, round(epoch_seconds + seconds, 3)]
            p["rows"].append(row)
            improved = val_acc is not None and (p["best_val_acc"] is None or val_acc > p["best_val_acc"])
            if improved:
                p["best_val_acc"], p["best_epoch"], p["bad_epochs"] = val_acc, epoch + 1, 0
            elif val_acc is not None:
                p["bad_epochs"] += 1
            if cfg.early_stop is not None and p["bad_epochs"] >= cfg.early_stop:
                p["stopped"] = "early_stop"
            elif p["epoch"] >= cfg.epochs:
                p["stopped"] = "completed"
            if main:
                if improved:
                    save_weights(run_dir / BEST, model, meta(epoch + 1, val_acc))
                checkpoint()
                if val_loader is None:  # no validation data: the best weights are the last ones
                    save_weights(run_dir / BEST, model, meta(epoch + 1, None))
                _write_records(run_dir, p["rows"], summary())
            bar.end_epoch(f"epoch {label}  lr {lr:.4g}  train loss {row[2]:.4f} acc {row[3]:.4f}  "
                          f"val loss {_fmt(val_loss)} acc {_fmt(val_acc)}  {row[6]:.1f}s")
            if p["stopped"] == "early_stop":
                bar.print(f"early stop: no better validation accuracy for {cfg.early_stop} epochs "
                          f"(best {p['best_val_acc']:.4f} at epoch {p['best_epoch']})")

    if p["stopped"] == "interrupted":
        result = summary()
        if main:
            write_json(run_dir / run_files.SUMMARY, result)
        return result
    test = None
    if bundle.test is not None:
        if ctx.broadcast(p["best_epoch"] is not None and (run_dir / BEST).is_file()):
            if main:
                weights, _ = read_weights(run_dir / BEST)
                model.load_state_dict(weights)
            ctx.broadcast_state(model)
        t = ctx.all_reduce_sums(dict(zip(("loss", "correct", "count"),
                                         evaluate_sums(model, eval_loader(bundle.test), precision).tolist())))
        test = {"acc": t["correct"] / t["count"], "loss": t["loss"] / t["count"]}
    result = summary(test)
    if main:
        write_json(run_dir / run_files.SUMMARY, result)
    return result


def _write_records(run_dir: Path, rows: list[list], summary: dict) -> None:
    from reslab import plots

    run_files.write_metrics(run_dir / run_files.METRICS, rows)
    write_json(run_dir / run_files.SUMMARY, summary)
    plots.curves(run_dir / run_files.CURVES, rows)
